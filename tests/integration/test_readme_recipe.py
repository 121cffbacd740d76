"""The README's server recipe, run as written on 127.0.0.1: PostgreSQL from scripts/postgres.sh, a Prefect server on
it, the work pool, the four deployments, the automations, a process worker and the watcher.

The bash block under "### Against a Prefect server (one host)" runs unchanged; the test only points the
variables that block reads (PGDATA, PGPORT, PREFECT_SERVER_API_PORT, FEDSCAN_DATA_ROOT, FEDSCAN_INCOMING) at free
ports and its own folders. Then a scan lands in the incoming folder and must be processed, and a run whose worker
is SIGKILLed must become Crashed within the bound the README states; both a failed and that crashed run reach the
webhook of `fedscan notify-failures`. Everything started is stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests.integration.services import ROOT, base_env, free_port, require_postgres

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SECTION = "### Against a Prefect server (one host)"
#: the README's promise: a run whose worker died is Crashed within about two minutes (90 s without a heartbeat,
#: heartbeats every 30 s, plus the trigger service's evaluation)
CRASH_BOUND_S = 120.0


def readme_recipe() -> str:
    """The first bash block of the README's server section, verbatim."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(SECTION) :]
    match = re.search(r"```bash\n(.*?)```", section, flags=re.S)
    assert match is not None, "no bash block in the README's server section"
    return match.group(1)


@dataclass
class Recipe:
    api: str
    pgport: int
    pool: str
    incoming: Path
    data_root: Path
    work: Path
    proc: subprocess.Popen

    def log(self) -> str:
        return (self.work / "recipe.log").read_text(errors="replace")[-6000:]


def _stop_group(pgid: int) -> None:
    for sig, wait_s in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.5)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Iterator[Recipe]:
    require_postgres()
    work = tmp_path_factory.mktemp("recipe")
    pg_parent = Path(tempfile.mkdtemp(prefix="fedscan-pg-"))  # reachable by the system user postgres
    pg_parent.chmod(0o711)
    env = base_env(work)
    env.pop("FEDSCAN_PROJECT_DIR")  # the recipe sets it itself
    port, pgport = free_port(), free_port()
    env.update(
        PGDATA=str(pg_parent / "data"),
        PGPORT=str(pgport),
        PREFECT_SERVER_API_PORT=str(port),
        FEDSCAN_DATA_ROOT=str(work / "data"),
        FEDSCAN_INCOMING=str(work / "incoming"),
    )
    log = (work / "recipe.log").open("wb")
    proc = subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", readme_recipe()],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        rc = proc.wait(timeout=600)
        recipe = Recipe(
            api=f"http://127.0.0.1:{port}/api",
            pgport=pgport,
            pool="fedscan-process",
            incoming=work / "incoming",
            data_root=work / "data",
            work=work,
            proc=proc,
        )
        assert rc == 0, f"the README recipe failed ({rc}):\n{recipe.log()}"
        yield recipe
    finally:
        _stop_group(proc.pid)  # the server, the worker and the watcher it left running
        subprocess.run(
            [str(ROOT / "scripts" / "postgres.sh"), "destroy"], env=env, capture_output=True, timeout=120, check=False
        )
        shutil.rmtree(pg_parent, ignore_errors=True)


@contextlib.asynccontextmanager
async def _client(api: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api}):
        async with get_client() as client:
            yield client


async def _deployments_and_automations(api: str) -> tuple[set[str], set[str]]:
    async with _client(api) as client:
        deployments = await client.read_deployments()
        automations = await client.read_automations()
    return {d.name for d in deployments}, {a.name for a in automations}


async def _runs_of(api: str, deployment: str) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    async with _client(api) as client:
        return await client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment]))
        )


async def _read_run(api: str, run_id):
    async with _client(api) as client:
        return await client.read_flow_run(run_id)


async def _count_flow_runs_in_postgres(pgport: int) -> int:
    import asyncpg

    conn = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{pgport}/prefect")
    try:
        return int(await conn.fetchval("SELECT count(*) FROM flow_run"))
    finally:
        await conn.close()


def test_recipe_runs_as_written_and_processes_an_arriving_scan(recipe):
    from flows.demo import make_scanner_output
    from schemas.demo import DemoSize

    names, automations = asyncio.run(_deployments_and_automations(recipe.api))
    assert names >= {"nightly", "on-scan-arrived", "federated-training", "ingest-scans"}, names
    assert "crash zombie flow runs" in automations, automations

    staged = make_scanner_output(
        recipe.work / "staging", n_sites=1, scans_per_site=1, n_slices=4, size=DemoSize.TINY, seed=5
    )
    ((site_id, (src,)),) = staged.items()
    dest = recipe.incoming / site_id
    dest.mkdir(parents=True)
    shutil.copy(src.with_name(src.name + ".yaml"), dest / (src.name + ".yaml"))
    shutil.copy(src, dest / src.name)

    deadline = time.monotonic() + 480
    run = None
    while time.monotonic() < deadline:
        runs = asyncio.run(_runs_of(recipe.api, "on-scan-arrived"))
        if runs and runs[0].state is not None and runs[0].state.is_final():
            run = runs[0]
            break
        time.sleep(3)
    assert run is not None, f"no finished on-scan-arrived run\n{recipe.log()}"
    assert run.state.is_completed(), f"{run.state}\n{recipe.log()}"
    assert len(asyncio.run(_runs_of(recipe.api, "on-scan-arrived"))) == 1
    assert (recipe.data_root / f"{site_id}.zarr").is_dir()
    # the server keeps its state in PostgreSQL, not in a SQLite file
    assert asyncio.run(_count_flow_runs_in_postgres(recipe.pgport)) >= 1


def _worker_process(recipe: Recipe) -> psutil.Process:
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            cmd = p.info["cmdline"] or []
            if os.getpgid(p.pid) == recipe.proc.pid and "worker" in cmd and "start" in cmd:
                return p
    raise AssertionError(f"no prefect worker left by the recipe\n{recipe.log()}")


class Webhook(http.server.ThreadingHTTPServer):
    """A webhook receiver on 127.0.0.1 that keeps every JSON body posted to it."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(handler) -> None:
                length = int(handler.headers.get("Content-Length", 0))
                self.bodies.append(json.loads(handler.rfile.read(length) or b"{}"))
                handler.send_response(200)
                handler.end_headers()

            def log_message(handler, *args) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"

    def wait_for(self, *words: str, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for body in self.bodies:
                if all(w in json.dumps(body) for w in words):
                    return body
            time.sleep(1)
        raise AssertionError(f"no notice with {words} after {timeout:.0f} s; got {self.bodies}")


@pytest.fixture(scope="module")
def webhook(recipe) -> Iterator[Webhook]:
    """A receiver, and `fedscan notify-failures` pointing the server's failure notices at it."""
    hook = Webhook()
    thread = threading.Thread(target=hook.serve_forever, daemon=True)
    thread.start()
    env = {**base_env(recipe.work), "PREFECT_API_URL": recipe.api}
    out = subprocess.run(
        ["fedscan", "notify-failures", hook.url], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stderr
    try:
        yield hook
    finally:
        hook.shutdown()
        hook.server_close()


def _start_sleepy_run(recipe: Recipe, *, seconds: float):
    """Deploy tests/integration/sleepy_flow.py with fedscan's tag and heartbeats; start one run; its id."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tests.integration.sleepy_flow import sleep_for

    with temporary_settings(updates={PREFECT_API_URL: recipe.api}):
        flow = sleep_for.from_source(source=str(ROOT), entrypoint="tests/integration/sleepy_flow.py:sleep_for")
        deployment_id = flow.deploy(
            name="sleepy",
            work_pool_name=recipe.pool,
            tags=["fedscan"],
            job_variables={"env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}},
            print_next_steps=False,
        )

    async def start() -> object:
        async with _client(recipe.api) as client:
            run = await client.create_flow_run_from_deployment(deployment_id, parameters={"seconds": seconds})
            return run.id

    return asyncio.run(start())


def test_failed_fedscan_run_notifies_the_webhook(recipe, webhook):
    run_id = _start_sleepy_run(recipe, seconds=-1)  # time.sleep(-1) raises: the run fails
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        run = asyncio.run(_read_run(recipe.api, run_id))
        if run.state is not None and run.state.is_final():
            break
        time.sleep(2)
    assert run.state.is_failed(), run.state
    body = webhook.wait_for(run.name, "Failed")
    assert "fedscan:" in body["subject"], body


def test_run_whose_worker_is_killed_is_crashed_within_the_bound(recipe, webhook):
    run_id = _start_sleepy_run(recipe, seconds=600)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        run = asyncio.run(_read_run(recipe.api, run_id))
        if run.state is not None and run.state.is_running():
            break
        time.sleep(2)
    else:
        raise AssertionError(f"the sleepy run never started\n{recipe.log()}")
    time.sleep(5)  # its first heartbeat is out

    worker = _worker_process(recipe)
    doomed = [*worker.children(recursive=True), worker]  # the flow run's process dies with it
    assert len(doomed) >= 2, doomed
    for p in doomed:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    psutil.wait_procs(doomed, timeout=10)

    while time.monotonic() - killed_at < CRASH_BOUND_S + 60:
        run = asyncio.run(_read_run(recipe.api, run_id))
        if run.state is not None and run.state.is_final():
            break
        time.sleep(2)
    took = time.monotonic() - killed_at
    assert run.state.is_crashed(), f"{run.state} {took:.0f} s after the kill"
    assert took <= CRASH_BOUND_S, f"Crashed only {took:.0f} s after the kill (bound {CRASH_BOUND_S:.0f} s)"
    webhook.wait_for(run.name, "Crashed")
