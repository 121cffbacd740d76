"""Start real services on 127.0.0.1 for the integration tests and stop them by PID."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: Callable[[], bool], *, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.5)
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s")


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=3) as resp:
        return bool(resp.status == 200)


@dataclass
class Services:
    """Processes started for a test, each with its log file; ``stop()`` ends them all by PID."""

    workdir: Path
    env: dict[str, str]
    procs: list[tuple[str, subprocess.Popen]] = field(default_factory=list)

    def start(self, name: str, *cmd: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        log = (self.workdir / f"{name}.log").open("wb")
        exe = str(BIN / cmd[0]) if (BIN / cmd[0]).exists() else cmd[0]
        proc = subprocess.Popen(
            [exe, *cmd[1:]],
            cwd=ROOT,
            env={**self.env, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append((name, proc))
        return proc

    def run(self, *cmd: str, timeout: float = 300, env: dict[str, str] | None = None) -> str:
        exe = str(BIN / cmd[0]) if (BIN / cmd[0]).exists() else cmd[0]
        out = subprocess.run(
            [exe, *cmd[1:]],
            cwd=ROOT,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
        return out.stdout

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        for _name, proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for _name, proc in reversed(self.procs):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


@contextlib.contextmanager
def services(workdir: Path, env: dict[str, str]) -> Iterator[Services]:
    svc = Services(workdir, env)
    try:
        yield svc
    finally:
        svc.stop()


def base_env(workdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "FEDSCAN_", "FLWR_"))}
    env.update(
        PREFECT_HOME=str(workdir / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_HOME=str(workdir / "flwr-home"),
        FEDSCAN_PROJECT_DIR=str(ROOT),
        FEDSCAN_PREFECT__WORK_POOL="fedscan-process",  # prefect.yaml's work pool
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    return env


def require_postgres() -> None:
    """Fail under CI (scripts/_system_deps.sh installs PostgreSQL there) and skip with the reason elsewhere."""
    if glob.glob("/usr/lib/postgresql/*/bin/initdb") or shutil.which("initdb"):
        return
    reason = "PostgreSQL is not installed (apt-get install postgresql; scripts/_system_deps.sh does it as root)"
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        pytest.fail(reason)
    pytest.skip(reason)


@contextlib.contextmanager
def postgres() -> Iterator[str]:
    """A throw-away PostgreSQL cluster on 127.0.0.1 from scripts/postgres.sh; yields Prefect's connection URL.

    The cluster lives under /tmp, not pytest's private tmp_path: as root it runs as the system user ``postgres``.
    """
    require_postgres()
    parent = Path(tempfile.mkdtemp(prefix="fedscan-pg-"))
    parent.chmod(0o711)
    env = {**os.environ, "PGDATA": str(parent / "data"), "PGPORT": str(free_port()), "PGDATABASE": "prefect"}
    script = str(ROOT / "scripts" / "postgres.sh")
    try:
        out = subprocess.run([script, "start"], env=env, capture_output=True, text=True, timeout=180, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"scripts/postgres.sh start failed ({out.returncode}):\n{out.stderr}")
        yield out.stdout.strip()
    finally:
        subprocess.run([script, "destroy"], env=env, capture_output=True, timeout=120, check=False)
        shutil.rmtree(parent, ignore_errors=True)
