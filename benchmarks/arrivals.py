"""Load test: scans arriving in a burst at a real Prefect server, on SQLite and on PostgreSQL side by side.

For each database: a `prefect server start` on 127.0.0.1 (SQLite under its own PREFECT_HOME, the same with fewer
server services (`sqlite-lean`, SQLITE_LEAN_ENV), or a throw-away cluster from scripts/postgres.sh), the
`on-scan-arrived` deployment of prefect.yaml on a process pool, two process workers and `fedscan watch`. Then N
scans (50; `--quick`: 6) land in the incoming folder within 10 s, each moved in whole (sidecar first) at an even
spacing, and the run waits until every scan's flow run has finished.

Reported per database:

- ``scans_processed_fraction``: scans with a Completed on-scan-arrived run / scans dropped (want 1);
- ``duplicate_flow_runs``: on-scan-arrived runs beyond one per scan (want 0);
- ``max_api_stall_s``: the longest answer, seconds, of a probe that reads one flow run from the API (a database
  query) every 0.5 s from the first arrival to the last finished run (want < 5);
- ``p95_arrival_to_surrogate_s``: 95th percentile over scans of (the run's end, after its surrogate stage) −
  (the moment the scan landed), seconds;
- ``server_cpu_s_per_scan``: CPU seconds of the server's process tree, plus the PostgreSQL cluster's on Postgres
  (SQLite works inside the server process), from before the first arrival to the end, per scan.

Everything it starts it stops. Needs PostgreSQL for the postgres row (Debian's `postgresql` package).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import parse_args, print_table, write_json  # noqa: E402

BIN = Path(sys.executable).parent
POOL = "arrivals"
DEPLOYMENT = "on-scan-arrived"
KEYS = (
    "scans_processed_fraction",
    "duplicate_flow_runs",
    "max_api_stall_s",
    "p95_arrival_to_surrogate_s",
    "server_cpu_s_per_scan",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _exe(name: str) -> str:
    return str(BIN / name) if (BIN / name).exists() else name


def _api(api: str, method: str, path: str, body: Any = None, timeout: float = 60.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{api}{path}", data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"null")


def _tree_cpu_s(pid: int) -> float:
    """CPU seconds of a process, its reaped children and its live descendants."""
    try:
        root = psutil.Process(pid)
        t = root.cpu_times()
        total = t.user + t.system + t.children_user + t.children_system
        for child in root.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                c = child.cpu_times()
                total += c.user + c.system
    except psutil.Error:
        return math.nan
    return total


class Processes:
    """Long-running processes of one run, each in its own process group, stopped by PID."""

    def __init__(self, work: Path, env: dict[str, str]) -> None:
        self.work, self.env = work, env
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, *cmd: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        log = (self.work / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            [_exe(cmd[0]), *cmd[1:]],
            cwd=ROOT,
            env={**self.env, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def run(self, *cmd: str, env: dict[str, str] | None = None, timeout: float = 600) -> str:
        out = subprocess.run(
            [_exe(cmd[0]), *cmd[1:]],
            cwd=ROOT,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
            )
        return out.stdout

    def stop(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        for proc in reversed(self.procs):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


@contextlib.contextmanager
def database(kind: str) -> Iterator[tuple[str | None, Path | None]]:
    """(Prefect's connection URL or None for the default SQLite, the PostgreSQL data folder or None)."""
    if kind in {"sqlite", "sqlite-lean"}:
        yield None, None
        return
    parent = Path(tempfile.mkdtemp(prefix="fedscan-arrivals-pg-"))
    parent.chmod(0o711)  # as root the cluster runs as the system user postgres
    env = {**os.environ, "PGDATA": str(parent / "data"), "PGPORT": str(_free_port()), "PGDATABASE": "prefect"}
    script = str(ROOT / "scripts" / "postgres.sh")
    try:
        out = subprocess.run([script, "start"], env=env, capture_output=True, text=True, timeout=300, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"scripts/postgres.sh start failed:\n{out.stderr}")
        yield out.stdout.strip(), parent / "data"
    finally:
        subprocess.run([script, "destroy"], env=env, capture_output=True, timeout=120, check=False)
        shutil.rmtree(parent, ignore_errors=True)


#: SQLite with fewer writers beside the API: the server services that write on a timer and that fedscan does not
#: need on one host (cancellation cleanup, pause expirations, the lease repossessor and cleanup reconciler, event
#: vacuum, late-run marking); the scheduler, triggers, event persister and task-run recorder stay.
SQLITE_LEAN_ENV = {
    "PREFECT_SERVER_SERVICES_CANCELLATION_CLEANUP_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_PAUSE_EXPIRATIONS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_REPOSSESSOR_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_CLEANUP_RECONCILER_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED": "[]",
    "PREFECT_SERVER_SERVICES_FOREMAN_LOOP_SECONDS": "60",
}


def _postmaster_pid(pgdata: Path | None) -> int | None:
    if pgdata is None:
        return None
    return int((pgdata / "postmaster.pid").read_text().splitlines()[0])


class StallProbe(threading.Thread):
    """Reads one flow run from the API every ``every_s``; remembers the slowest answer."""

    def __init__(self, api: str, every_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.api, self.every_s, self.worst_s, self.calls = api, every_s, 0.0, 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            start = time.monotonic()
            with contextlib.suppress(Exception):  # a failed call counts with the time it took
                _api(self.api, "POST", "/flow_runs/filter", {"limit": 1}, timeout=120)
            took = time.monotonic() - start
            self.worst_s, self.calls = max(self.worst_s, took), self.calls + 1
            self._halt.wait(max(0.0, self.every_s - took))

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=130)


def _stage_scans(staging: Path, n_scans: int) -> list[tuple[str, Path]]:
    """(site, scanner file) for ``n_scans`` small scans over two sites."""
    from flows.demo import make_scanner_output
    from schemas.demo import DemoSize

    per_site = math.ceil(n_scans / 2)
    out = make_scanner_output(staging, n_sites=2, scans_per_site=per_site, n_slices=4, size=DemoSize.TINY, seed=11)
    pairs = [(site, src) for site, sources in out.items() for src in sources]
    return pairs[:n_scans]


def _drop(scans: list[tuple[str, Path]], incoming: Path, window_s: float) -> dict[str, float]:
    """Move each scan into ``incoming/<site>/`` (sidecar first, data renamed in whole), evenly over ``window_s``.

    Returns path → wall time (epoch seconds) at which the scan was complete in the incoming folder.
    """
    landing = incoming.parent / "landing"  # same filesystem: a rename is atomic
    arrived: dict[str, float] = {}
    t0 = time.monotonic()
    for i, (site, src) in enumerate(scans):
        time.sleep(max(0.0, t0 + i * window_s / len(scans) - time.monotonic()))
        dest_dir = incoming / site
        dest_dir.mkdir(parents=True, exist_ok=True)
        (landing / site).mkdir(parents=True, exist_ok=True)
        sidecar = src.with_name(src.name + ".yaml")
        shutil.copy(sidecar, landing / site / sidecar.name)
        shutil.copy(src, landing / site / src.name)
        os.replace(landing / site / sidecar.name, dest_dir / sidecar.name)
        os.replace(landing / site / src.name, dest_dir / src.name)
        arrived[str(dest_dir / src.name)] = time.time()
    return arrived


def _runs(api: str) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    while True:
        page = _api(
            api,
            "POST",
            "/flow_runs/filter",
            {"deployments": {"name": {"any_": [DEPLOYMENT]}}, "limit": 200, "offset": len(runs)},
            timeout=120,
        )
        runs += page
        if len(page) < 200:
            return runs


def _wait_health(api: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}")
        with contextlib.suppress(Exception):
            _api(api, "GET", "/health", timeout=3)
            return
        time.sleep(1)
    raise TimeoutError(f"prefect server not healthy after {timeout_s:.0f} s")


def run_one(
    kind: str, n_scans: int, work: Path, *, window_s: float, timeout_s: float, idle_s: float = 180.0
) -> dict[str, Any]:
    """Start everything on ``kind`` (sqlite | sqlite-lean | postgres), drop the scans, measure, stop everything."""
    work.mkdir(parents=True)
    incoming, data_root = work / "incoming", work / "data"
    incoming.mkdir()
    scans = _stage_scans(work / "staging", n_scans)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "FEDSCAN_"))}
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env.update(
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
        PREFECT_HOME=str(work / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        PREFECT_API_URL=api,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY="30",
        PREFECT_WORKER_QUERY_SECONDS="5",
        FEDSCAN_PROJECT_DIR=str(ROOT),
        FEDSCAN_PREFECT__WORK_POOL=POOL,
        FEDSCAN_DATA_ROOT=str(data_root),
        FEDSCAN_INCOMING=str(incoming),
        FEDSCAN_DEVICE="cpu",
    )
    procs = Processes(work, env)
    server_env = SQLITE_LEAN_ENV if kind == "sqlite-lean" else None
    with database(kind) as (url, pgdata):
        try:
            server = procs.start(
                "server",
                "prefect",
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                env={"PREFECT_API_DATABASE_CONNECTION_URL": url} if url else server_env,
            )
            _wait_health(api, server, 300)
            procs.run("prefect", "work-pool", "create", POOL, "--type", "process", "--overwrite")
            procs.run("prefect", "--no-prompt", "deploy", "--name", DEPLOYMENT)
            for i in (1, 2):
                procs.start(
                    f"worker-{i}", "prefect", "worker", "start", "--pool", POOL, "--name", f"w{i}", "--limit", "2"
                )
            procs.start(
                "watcher", "fedscan", "watch", str(incoming), "--settle-seconds", "1", "--interval-seconds", "0.5"
            )
            time.sleep(5)  # the watcher's first scan of an empty folder; the workers' first poll
            postmaster = _postmaster_pid(pgdata)
            cpu0 = _tree_cpu_s(server.pid) + (_tree_cpu_s(postmaster) if postmaster else 0.0)
            probe = StallProbe(api)
            probe.start()
            arrived = _drop(scans, incoming, window_s)
            deadline = time.monotonic() + timeout_s
            runs: list[dict[str, Any]] = []
            seen, changed_at = -1, time.monotonic()
            while time.monotonic() < deadline:
                try:
                    runs = _runs(api)
                except OSError:  # a stalled API (the probe records how long); ask again
                    continue
                finals = [r for r in runs if r["state_type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}]
                done = len({r["parameters"].get("path") for r in finals})
                if done >= len(arrived):
                    break
                if done != seen or len(finals) < len(runs):
                    seen, changed_at = done, time.monotonic()
                elif time.monotonic() - changed_at > idle_s:  # every run is final: an arrival never became one
                    break
                time.sleep(3)
            probe.stop()
            cpu1 = _tree_cpu_s(server.pid) + (_tree_cpu_s(postmaster) if postmaster else 0.0)
            for attempt in range(5):
                try:
                    runs = _runs(api)
                    break
                except OSError:
                    if attempt == 4:
                        raise
        finally:
            procs.stop()
    by_path: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_path.setdefault(r["parameters"].get("path"), []).append(r)
    latencies = []
    completed = 0
    for path, t_arrived in arrived.items():
        finished = [r for r in by_path.get(path, []) if r["state_type"] == "COMPLETED" and r.get("end_time")]
        if finished:
            completed += 1
            end = min(datetime.fromisoformat(r["end_time"]).timestamp() for r in finished)
            latencies.append(end - t_arrived)
    latencies.sort()
    p95 = latencies[min(len(latencies) - 1, math.ceil(0.95 * len(latencies)) - 1)] if latencies else math.nan
    states: dict[str, int] = {}
    for r in runs:
        states[r["state_type"]] = states.get(r["state_type"], 0) + 1
    return {
        "database": kind,
        "scans": len(arrived),
        "flow_runs": len(runs),
        "states": " ".join(f"{k}={v}" for k, v in sorted(states.items())),
        "scans_processed_fraction": completed / len(arrived),
        "duplicate_flow_runs": len(runs) - len([p for p in by_path if p in arrived]),
        "max_api_stall_s": probe.worst_s,
        "p95_arrival_to_surrogate_s": p95,
        "median_arrival_to_surrogate_s": latencies[len(latencies) // 2] if latencies else math.nan,
        "server_cpu_s_per_scan": (cpu1 - cpu0) / len(arrived),
        "probe_calls": probe.calls,
    }


def main(argv: list[str] | None = None) -> None:
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--scans", type=int, default=None, help="scans to drop (default 50; --quick: 6)")
    own.add_argument("--window-s", type=float, default=10.0, help="the scans land within this many seconds")
    own.add_argument(
        "--databases",
        default="sqlite,sqlite-lean,postgres",
        help="comma-separated: sqlite, sqlite-lean (fewer server services), postgres",
    )
    own.add_argument("--timeout-s", type=float, default=None, help="give up waiting for the runs after this")
    own.add_argument("--keep", type=Path, default=None, help="keep the logs and data of the runs in this folder")
    args = parse_args(__doc__.splitlines()[0], argv=argv, parents=[own])
    n_scans = args.scans or (6 if args.quick else 50)
    timeout_s = args.timeout_s or 300 + 30 * n_scans
    kinds = [k.strip() for k in args.databases.split(",") if k.strip()]
    unknown = set(kinds) - {"sqlite", "sqlite-lean", "postgres"}
    if unknown:
        raise SystemExit(f"arrivals.py: unknown database(s) {sorted(unknown)}")
    base = args.keep or Path(tempfile.mkdtemp(prefix="fedscan-arrivals-"))
    rows: list[dict[str, Any]] = []
    try:
        for kind in kinds:
            load = os.getloadavg()[0]
            row = run_one(kind, n_scans, base / kind, window_s=args.window_s, timeout_s=timeout_s)
            rows.append({**row, "load_1m_before": load, "load_1m_after": os.getloadavg()[0]})
            databases = {r["database"]: {k: r[k] for k in KEYS} for r in rows}
            ratios = {f"{db}_{k}": v for db, values in databases.items() for k, v in values.items()}
            write_json(args.json, rows, ratios, databases=databases)  # after each database: a partial run counts
            print(f"{kind}: done", file=sys.stderr)
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)
    print_table(rows)


if __name__ == "__main__":
    main()
