"""Flower services on one host: a SuperLink and SuperNodes as child processes, started and stopped by PID.

Flower means SuperLink and SuperNodes to be long-running services (systemd, compose, Kubernetes; see
``infra/``). These helpers start them for the embedded Simulation Engine, tests and benchmarks on 127.0.0.1,
on free ports, with their own ``FLWR_HOME`` and the offline environment; they never use the ``flwr`` CLI's
default ``local`` connection (which leaves a background SuperLink behind).

TLS and node authentication are configurable: :class:`TlsFiles` adds ``--ssl-*`` (SuperLink) and
``--root-certificates`` (SuperNode); ``enable_supernode_auth`` plus a node's ``auth_private_key`` turn on
SuperNode authentication (register the public key with ``flwr supernode register KEY.pub CONNECTION``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import httpx
import psutil

from tasks.errors import FedscanError

#: Environment every Flower process of ours gets (field notes: offline runs).
OFFLINE_ENV: dict[str, str] = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}


class FlowerServiceError(FedscanError, RuntimeError):
    """A SuperLink or SuperNode did not start, or died."""


class SuperLinkUnreachableError(FedscanError, ConnectionError):
    """No SuperLink answered at the given address within the timeout."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flower_env(flwr_home: str | Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The current environment plus :data:`OFFLINE_ENV`, ``FLWR_HOME`` and ``extra``."""
    env = dict(os.environ)
    env.update(OFFLINE_ENV)
    env["FLWR_HOME"] = str(flwr_home)
    env.update(extra or {})
    return env


def _bin(name: str) -> str:
    """The Flower executable beside this interpreter (the venv), else on PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise FlowerServiceError(f"{name} not found (is flwr installed in this environment?)")
    return found


def wait_for_health(
    address: str, *, timeout_s: float, tls: bool = False, verify: str | bool | ssl.SSLContext = True
) -> None:
    """Return once ``GET /health`` of the SuperLink at ``host:port`` answers.

    Raises :class:`SuperLinkUnreachableError` after ``timeout_s``.
    """
    url = f"{'https' if tls else 'http'}://{address}/health"
    if isinstance(verify, str):  # a CA bundle (PEM file)
        verify = ssl.create_default_context(cafile=verify)
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1.0, verify=verify).status_code < 500:
                return
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.25)
    raise SuperLinkUnreachableError(f"no SuperLink at {address} answered within {timeout_s:.0f} s ({last})")


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for TLS between the CLI, SuperLink and SuperNodes."""

    ca_certfile: Path
    certfile: Path
    keyfile: Path


def _spawn(
    cmd: list[str], *, log_path: Path, flwr_home: Path, env: Mapping[str, str]
) -> tuple[subprocess.Popen[bytes], IO[bytes]]:
    """Start a Flower service in its own process group, its output appended to ``log_path``."""
    log = log_path.open("ab")
    proc = subprocess.Popen(
        cmd, env=flower_env(flwr_home, env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    return proc, log


def descendants(pid: int) -> list[psutil.Process]:
    """Every live process below ``pid`` (children, their children, ...); empty when ``pid`` is gone."""
    try:
        return list(psutil.Process(pid).children(recursive=True))
    except psutil.NoSuchProcess:
        return []


def _stop(proc: subprocess.Popen[bytes], *, grace_s: float = 10.0) -> None:
    """SIGTERM the process group we started and every process below it, then SIGKILL what is left after
    ``grace_s``.

    The tree is listed before any signal: Ray puts some of its processes (raylet, gcs_server, workers) in
    process groups of their own, and once their parent dies they are no longer below ours.
    """
    tree = descendants(proc.pid)
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    for child in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)
    _, alive = psutil.wait_procs(tree, timeout=grace_s)
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    for child in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(alive, timeout=grace_s)
    proc.wait(timeout=grace_s)


@dataclass
class SuperLink:
    """A ``flower-superlink`` child process on 127.0.0.1 (one HTTP port for Control, Fleet and Runtime APIs)."""

    flwr_home: Path
    simulation: bool = False
    tls: TlsFiles | None = None
    enable_supernode_auth: bool = False
    env: Mapping[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 0
    log_path: Path | None = None
    startup_timeout_s: float = 60.0
    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> Self:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        cmd = [
            _bin("flower-superlink"),
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--disable-runtime-dependency-installation",
        ]
        if self.simulation:
            cmd.append("--simulation")
        if self.tls is None:
            cmd.append("--insecure")
        else:
            cmd += [
                "--ssl-ca-certfile",
                str(self.tls.ca_certfile),
                "--ssl-certfile",
                str(self.tls.certfile),
                "--ssl-keyfile",
                str(self.tls.keyfile),
            ]
        if self.enable_supernode_auth:
            cmd.append("--enable-supernode-auth")
        self.log_path = self.log_path or self.flwr_home / f"superlink-{self.port}.log"
        self.proc, self._log = _spawn(cmd, log_path=self.log_path, flwr_home=self.flwr_home, env=self.env)
        try:
            wait_for_health(
                self.address,
                timeout_s=self.startup_timeout_s,
                tls=self.tls is not None,
                verify=str(self.tls.ca_certfile) if self.tls else True,
            )
        except SuperLinkUnreachableError as exc:
            self.stop()
            raise FlowerServiceError(f"flower-superlink did not become healthy; see {self.log_path}") from exc
        return self

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


@dataclass
class SuperNode:
    """A ``flower-supernode`` child process serving one site (its store path in ``--node-config``)."""

    superlink: str
    flwr_home: Path
    node_config: Mapping[str, str | int | float | bool]
    root_certificates: Path | None = None
    auth_private_key: Path | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    port: int = 0
    log_path: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    def start(self) -> Self:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        node_cfg = " ".join(f"{k}={_toml_value(v)}" for k, v in self.node_config.items())
        cmd = [
            _bin("flower-supernode"),
            "--superlink",
            self.superlink,
            "--node-config",
            node_cfg,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        cmd += ["--root-certificates", str(self.root_certificates)] if self.root_certificates else ["--insecure"]
        if self.auth_private_key is not None:
            cmd += ["--auth-supernode-private-key", str(self.auth_private_key)]
        self.log_path = self.log_path or self.flwr_home / f"supernode-{self.port}.log"
        self.proc, self._log = _spawn(cmd, log_path=self.log_path, flwr_home=self.flwr_home, env=self.env)
        return self

    def kill(self) -> None:
        """SIGKILL the node's whole process group (a crash, as the dropout tests need)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)
        if self._log is not None:
            self._log.close()
            self._log = None


def _toml_value(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return "'" + str(value).replace("'", "") + "'"


def stop_all(services: Sequence[SuperLink | SuperNode]) -> None:
    """Stop services in reverse order of start."""
    for s in reversed(services):
        s.stop()
