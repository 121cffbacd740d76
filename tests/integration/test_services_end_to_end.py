"""The deployed topology on 127.0.0.1, with real processes: Prefect server on PostgreSQL + process worker, a Dask
scheduler with two workers, a Flower SuperLink with one SuperNode per site, and the folder watcher.

It deploys from prefect.yaml, drops a scan into the watched folder, waits for the event-triggered run to
complete with its artifacts (checked through the Prefect API and in a real headless Chromium), then runs the
``nightly`` deployment. Everything it started, it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from collections.abc import AsyncIterator
from uuid import UUID

import pytest

from schemas.settings import WORKER_ALLOCATOR_ENVIRON
from tests.integration.browser import chromium, chromium_path, evaluate_when_ready
from tests.integration.services import base_env, free_port, http_ok, postgres, services, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@contextlib.asynccontextmanager
async def api_client(api: str) -> AsyncIterator:
    """A Prefect client for the server under test (settings are read at import; override them here)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api}):
        async with get_client() as client:
            yield client


async def _flow_runs(api: str, deployment_name: str) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    async with api_client(api) as client:
        return await client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment_name]))
        )


async def _artifacts(api: str, flow_run_id: UUID) -> list:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async with api_client(api) as client:
        return await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )


async def _run_deployment(api: str, name: str, parameters: dict) -> UUID:

    async with api_client(api) as client:
        dep = await client.read_deployment_by_name(name)
        run = await client.create_flow_run_from_deployment(dep.id, parameters=parameters)
        return run.id


async def _flow_run(api: str, run_id: UUID):

    async with api_client(api) as client:
        return await client.read_flow_run(run_id)


def _wait_final(api: str, run_id: UUID, timeout: float, svc) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = asyncio.run(_flow_run(api, run_id))
        if run.state is not None and run.state.is_final():
            return run
        time.sleep(2)
    raise TimeoutError(
        f"flow run {run_id} not finished after {timeout} s\nworker log:\n{svc.log('prefect-worker')[-4000:]}"
    )


def test_deployed_topology_on_loopback(tmp_path):
    from flows.demo import make_scanner_output
    from schemas.demo import DemoSize
    from tasks.demo.build import build_demo_sites
    from tasks.federated.client_app import NODE_STORE_KEY
    from tasks.federated.services import SuperLink, SuperNode

    work = tmp_path
    data_root = work / "data"
    incoming = work / "incoming"
    incoming.mkdir()
    stores = build_demo_sites(data_root, n_sites=2, scans_per_site=2, n_slices=4, seed=3, size=DemoSize.TINY)
    staged = make_scanner_output(work / "staging", n_sites=1, scans_per_site=1, n_slices=4, size=DemoSize.TINY, seed=9)
    env = base_env(work)

    with postgres() as database_url, services(work, env) as svc:
        # --- Prefect server on PostgreSQL (the long-running path; SQLite locks under load) -----------
        port = free_port()
        api = f"http://127.0.0.1:{port}/api"
        server = svc.start(
            "prefect-server",
            "prefect",
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            env={
                "PREFECT_UI_API_URL": api,  # the UI's own calls go to this server, not the default port
                "PREFECT_API_DATABASE_CONNECTION_URL": database_url,
            },
        )
        wait_until(lambda: http_ok(f"{api}/health"), timeout=180, what="prefect server", proc=server)
        svc.env["PREFECT_API_URL"] = api

        # --- Dask: scheduler + two workers ------------------------------------------------------
        dport = free_port()
        address = f"tcp://127.0.0.1:{dport}"
        svc.start(
            "dask-scheduler",
            "dask",
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            str(dport),
            "--dashboard-address",
            ":0",
        )
        for i in (1, 2):
            svc.start(
                f"dask-worker-{i}",
                "dask",
                "worker",
                address,
                "--nthreads",
                "1",
                "--name",
                f"w{i}",
                "--memory-limit",
                "4GiB",
                "--dashboard-address",
                ":0",
                env=dict(WORKER_ALLOCATOR_ENVIRON),  # as infra/compose.yaml's dask-worker
            )

        from distributed import Client

        def two_workers() -> bool:
            with Client(address, timeout=5) as c:
                return len(c.scheduler_info()["workers"]) == 2

        wait_until(two_workers, timeout=120, what="dask workers")
        with Client(address, timeout=5) as c:  # the nanny passed the allocator settings on, over Dask's own
            seen = c.run(lambda: {k: os.environ.get(k) for k in WORKER_ALLOCATOR_ENVIRON})
        assert list(seen.values()) == [WORKER_ALLOCATOR_ENVIRON] * 2, seen

        # --- Flower: SuperLink + one SuperNode per site ------------------------------------------
        flwr_home = work / "flwr-home"
        link = SuperLink(flwr_home=flwr_home).start()
        nodes = [
            SuperNode(superlink=link.address, flwr_home=flwr_home, node_config={NODE_STORE_KEY: str(s)}).start()
            for s in stores
        ]
        try:
            svc.env.update(
                FEDSCAN_DATA_ROOT=str(data_root),
                FEDSCAN_INCOMING=str(incoming),  # on-scan-arrived refuses payload paths outside it
                FEDSCAN_DASK__ADDRESS=address,
                FEDSCAN_FLOWER__SUPERLINK_ADDRESS=link.address,
                FEDSCAN_FLOWER__INSECURE="true",
                FEDSCAN_PREFECT__PROGRESS_AFTER_S="0",  # every stage shows its progress bar (they are short here)
            )
            # --- deploy from prefect.yaml, start a process worker and the watcher ------------------
            svc.run("prefect", "work-pool", "create", "fedscan-process", "--type", "process")
            svc.run("prefect", "--no-prompt", "deploy", "--all")
            svc.start(
                "prefect-worker", "prefect", "worker", "start", "--pool", "fedscan-process", "--prefetch-seconds", "5"
            )
            svc.start(
                "watcher", "fedscan", "watch", str(incoming), "--settle-seconds", "1", "--interval-seconds", "0.5"
            )
            time.sleep(3)

            # --- a scan lands: copied in pieces (incomplete first), then whole ---------------------
            ((site_id, (src,)),) = staged.items()
            dest_dir = incoming / site_id
            dest_dir.mkdir()
            sidecar = src.with_name(src.name + ".yaml")
            shutil.copy(sidecar, dest_dir / sidecar.name)
            data = src.read_bytes()
            dest = dest_dir / src.name
            dest.write_bytes(data[: len(data) // 3])  # still being written
            time.sleep(2.5)
            assert asyncio.run(_flow_runs(api, "on-scan-arrived")) == [], "an incomplete file triggered a run"
            dest.write_bytes(data)

            deadline = time.monotonic() + 180
            runs = []
            while time.monotonic() < deadline and not runs:
                runs = asyncio.run(_flow_runs(api, "on-scan-arrived"))
                time.sleep(2)
            assert len(runs) == 1, f"no triggered run\nwatcher log:\n{svc.log('watcher')[-3000:]}"
            run = _wait_final(api, runs[0].id, 300, svc)
            assert run.state.is_completed(), f"{run.state}\n{svc.log('prefect-worker')[-6000:]}"
            assert run.parameters["site_id"] == site_id and run.parameters["path"] == str(dest)

            # the stage tasks run in the triggered run itself (no subflow): its artifacts are the scan's
            artifacts = asyncio.run(_artifacts(api, run.id))
            kinds = {a.type for a in artifacts}
            assert {"markdown", "progress"} <= kinds, kinds
            cards = [a for a in artifacts if a.type == "markdown" and "| metric | value |" in str(a.data)]
            assert {str(a.key).split("-")[0] for a in cards} >= {"denoise", "reconstruct", "surrogate"}, kinds
            assert all(float(a.data) == 100.0 for a in artifacts if a.type == "progress")
            image = next(a for a in artifacts if a.type == "markdown" and "data:image/png" in str(a.data))

            # --- the operator's view: the stage card (table, then image) renders in a real browser ------
            if chromium_path() is not None:
                shot = work / "ui-artifact.png"
                with chromium() as cdp:
                    # ready once the PNG has decoded and the card's metrics table is an HTML table (not pipes)
                    script = (
                        "(() => { const imgs = [...document.querySelectorAll('img')]"
                        ".filter(i => i.src.startsWith('data:image/png'));"
                        " const cells = [...document.querySelectorAll('table td')].map(c => c.textContent.trim());"
                        " return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0)"
                        " && cells.includes('seconds') ? imgs.map(i => i.naturalWidth) : null; })()"
                    )
                    widths = evaluate_when_ready(
                        cdp,
                        f"http://127.0.0.1:{port}/artifacts/artifact/{image.id}",
                        script,
                        screenshot=shot,
                        timeout=90,
                    )
                assert widths, "the stage card's PNG or its metrics table did not render in Chromium"
                assert all(w >= 256 for w in widths)
                keep = os.environ.get("FEDSCAN_UI_SCREENSHOT")
                if keep:
                    shutil.copy(shot, keep)

            # --- nightly, through its deployment: every scan, then a federated round on the SuperLink -
            nightly_id = asyncio.run(
                _run_deployment(
                    api,
                    "nightly/nightly",
                    {
                        "request": {
                            "data_root": str(data_root),
                            "config": {"federation": {"num_rounds": 1, "local_epochs": 1, "min_available_clients": 2}},
                        }
                    },
                )
            )
            nightly = _wait_final(api, nightly_id, 480, svc)
            assert nightly.state.is_completed(), f"{nightly.state}\n{svc.log('prefect-worker')[-8000:]}"
            from tasks.storage import SiteStore

            for store in stores:
                for scan in SiteStore.open(store).scans():
                    assert scan.is_done("surrogate"), (store, scan.scan_id)
            assert (data_root / "report.html").is_file()
            report = (data_root / "report.html").read_text()
            assert "Federated rounds" in report
            assert "Failed scans" not in report
            assert not list((work / "prefect-home").glob("*.db")), "the server wrote a SQLite database"
        finally:
            for node in nodes:
                node.stop()
            link.stop()
