"""A Dask worker killed in the middle of a denoise stage: the Prefect task retries (a lost worker is a transient
fault), resumes the chunks not yet written, and the store ends complete and identical to an undisturbed run."""

from __future__ import annotations

import os
import signal
import threading
import time

import dask
import numpy as np
import pytest
import torch
from distributed import Client, LocalCluster
from prefect import flow

from schemas.denoise import DenoiseConfig
from schemas.refs import ScanRef
from tasks.prefect_tasks import scan_stage
from tasks.stages import run_scan_stage
from tasks.storage import SiteStore, missing_chunks
from tests.flows.test_pipeline_flows import make_site

pytestmark = pytest.mark.slow

CONFIG = DenoiseConfig(second_pass=True, view_stride=2)


@flow(name="denoise-one")
def denoise_one(ref: ScanRef) -> str:
    scan_stage(ref, "denoise", CONFIG, "cpu")
    return "ok"


def test_killed_dask_worker_mid_denoise_is_retried_and_result_is_identical(tmp_path, prefect_harness):
    reference_site = make_site(tmp_path / "ref", views=720, rows=8, cols=96)
    disturbed_site = make_site(tmp_path / "run", views=720, rows=8, cols=96)
    ref_scan = reference_site.scans()[0]
    with dask.config.set(scheduler="threads"):
        run_scan_stage(ref_scan, "denoise", CONFIG, device=torch.device("cpu"))
    expected = ref_scan.array("projections_denoised")[...]

    scan = disturbed_site.scans()[0]
    ref = ScanRef(store_uri=disturbed_site.uri, site_id=disturbed_site.site_id, scan_id=scan.scan_id)
    chunk_dir = tmp_path / "run" / "A.zarr" / "scans" / scan.scan_id / "projections_denoised" / "c"
    # No second chance inside Dask: a task on a killed worker fails the computation (KilledWorker), so the
    # recovery under test is Prefect's retry of the stage, which then resumes from the chunks on disk.
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster)
        try:
            pids = client.run(os.getpid)
            killed: dict[str, int] = {}

            def kill_when_half_written() -> None:
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    n = sum(1 for f in chunk_dir.rglob("*") if f.is_file()) if chunk_dir.exists() else 0
                    if n >= 2:
                        victim = next(iter(pids.values()))
                        killed["chunks_at_kill"] = n
                        os.kill(victim, signal.SIGKILL)
                        return
                    time.sleep(0.02)

            killer = threading.Thread(target=kill_when_half_written, daemon=True)
            killer.start()
            state = denoise_one(ref, return_state=True)
            killer.join(timeout=5)
        finally:
            client.close()
            cluster.close()

    assert killed, "the worker was never killed"
    total = scan.array("projections_denoised").nchunks
    assert killed["chunks_at_kill"] < total, "the kill must land before the last chunk"
    assert state.is_completed(), state
    scan = SiteStore.open(disturbed_site.uri).scan(scan.scan_id)
    assert missing_chunks(scan.array("projections_denoised")) == 0
    rec = scan.stage_record("denoise")
    assert rec is not None and rec.metrics["chunks_resumed"] > 0, rec
    np.testing.assert_array_equal(scan.array("projections_denoised")[...], expected)
