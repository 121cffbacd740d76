"""The pipeline flows on the embedded default (a temporary Prefect API, threads for Dask)."""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import pytest

from schemas.geometry import Geometry, ReconGrid
from schemas.ingest import IngestConfig
from schemas.manifest import ScanManifest
from schemas.stages import PIPELINE
from tasks.phantoms import parallel_line_integrals, shepp_logan
from tasks.storage import SiteStore, StageOutput


def make_site(
    root: Path,
    *,
    site_id: str = "A",
    n_scans: int = 1,
    views: int = 180,
    rows: int = 2,
    cols: int = 48,
    i0: float = 2e4,
    seed: int = 0,
    nan_in: int | None = None,
) -> SiteStore:
    """A site store with noisy Shepp–Logan scans (counts with I0), written as the ingest stage would."""
    grid = ReconGrid(nx_pixels=cols, ny_pixels=cols, pixel_size_mm=1.0)
    geometry = Geometry(
        beam="parallel", n_views=views, n_detector_cols=cols, n_detector_rows=rows, detector_pitch_mm=1.0, grid=grid
    )
    clean = parallel_line_integrals(shepp_logan(0.45 * cols), geometry).astype(np.float32)  # (views, cols)
    site = SiteStore.open_or_create(root / f"{site_id}.zarr", site_id=site_id)
    rng = np.random.default_rng(seed)
    for k in range(n_scans):
        counts = rng.poisson(i0 * np.exp(-np.repeat(clean[:, None, :], rows, axis=1))).astype(np.float32)
        p = np.log(i0 / np.maximum(counts, 0.5)).astype(np.float32)
        if nan_in is not None and k == nan_in:
            p[7, 0, 3] = np.nan
        sha = f"{seed:08x}{k:056x}"
        scan = site.create_scan(
            ScanManifest(
                scan_id=f"{site_id}-{k}",
                site_id=site_id,
                data_kind="counts",
                geometry=geometry,
                i0_photons=i0,
                source_sha256=sha,
            )
        )
        scan.run_stage(
            stage="ingest",
            config=IngestConfig(source_sha256=sha, reader="npy", data_kind="counts"),
            outputs=[StageOutput("projections", da.from_array(p), ("view", "row", "col"))],
        )
    return site


@pytest.mark.slow
def test_nightly_processes_every_scan_records_a_failure_and_reruns_skip(tmp_path, prefect_harness, device_setting_cpu):
    from flows.pipeline import NightlyRequest, PipelineFailedError, nightly

    make_site(tmp_path, site_id="A", n_scans=2)
    make_site(tmp_path, site_id="B", n_scans=2, seed=1, nan_in=1)  # B-1 holds a NaN: denoise refuses it
    state = nightly(NightlyRequest(data_root=str(tmp_path), federated=False), return_state=True)
    assert state.is_failed()  # red in the UI, naming the failed scan
    assert "1 of 4 scans failed: B/B-1 in denoise" in (state.message or "")
    with pytest.raises(PipelineFailedError) as raised:
        state.result()
    report = raised.value.report
    outcomes = {o.scan: o for o in report.scans}
    assert set(outcomes) == {"A/A-0", "A/A-1", "B/B-0", "B/B-1"}
    assert [o.scan for o in report.failed] == ["B/B-1"]
    assert outcomes["B/B-1"].failed_stage == "denoise"
    assert "non-finite" in (outcomes["B/B-1"].error or "") or "NaN" in (outcomes["B/B-1"].error or "")
    for site_id in ("A", "B"):
        for scan in SiteStore.open(tmp_path / f"{site_id}.zarr").scans():
            done = scan.scan_id != "B-1"
            assert scan.is_done("surrogate") is done
    html = Path(report.report_path).read_text()
    assert "Failed scans" in html and "B-1" in html and "data:image/png;base64," in html
    assert Path(report.report_path).parent == tmp_path / "reports"  # site-only, beside the stores
    assert "3 scans processed, 0 skipped (0 up to date, 0 known failures), 1 failed; federated: not run" in html
    assert "chance level" not in html  # no federated AUC, no note
    first = {s.scan_id: s.stage_record("denoise") for s in SiteStore.open(tmp_path / "A.zarr").scans()}
    for scan in SiteStore.open(tmp_path / "A.zarr").scans():  # FEDSCAN_DEVICE reached every stage
        assert [scan.stage_record(st).metrics["device"] for st in ("denoise", "reconstruct", "surrogate")] == [
            "cpu"
        ] * 3
        assert all("device" not in scan.stage_record(st).config for st in ("denoise", "reconstruct", "surrogate"))
    stage_names = [spec.name.value for spec in PIPELINE]
    assert {o.scan: o.stages for o in report.scans}["B/B-1"] == {"denoise": "failed"} | dict.fromkeys(
        stage_names[1:], "not-run"
    )
    assert {o.scan: o.stages for o in report.scans}["A/A-0"] == dict.fromkeys(stage_names, "done") | {
        "enhance": "disabled",  # optional, off without a model
        "diagnose": "not-applicable",  # no promoted model (the run is not federated)
    }
    # a rerun touches only what is left: B-1 failed under the same inputs, so it is listed once as still
    # failing (since the first night), not retried, and the run is not red again; finished stages keep their
    # records; the first night's report stays beside the second's
    second = nightly(NightlyRequest(data_root=str(tmp_path), federated=False), return_state=True)
    assert second.is_completed(), second.message
    rerun = second.result()
    assert rerun.scans == ()
    assert [(k.scan, k.stage) for k in rerun.known_failures] == [("B/B-1", "denoise")]
    marker = SiteStore.open(tmp_path / "B.zarr").scan("B-1").failure()
    assert rerun.known_failures[0].since == marker["since"]
    reports = sorted((tmp_path / "reports").glob("report-*.html"))
    assert len(reports) == 2 and Path(report.report_path) in reports and Path(rerun.report_path) in reports
    assert Path(report.report_path).read_text() == html  # not overwritten
    second_html = Path(rerun.report_path).read_text()
    assert "0 scans processed, 4 skipped (3 up to date, 1 known failures), 0 failed" in second_html
    assert "Still failing" in second_html and "Failed scans" not in second_html
    assert (tmp_path / "report.html").read_text() == second_html  # the latest
    # the runs' shareable summaries in the UI point each to its own report and open with the summary line
    import asyncio

    from prefect.client.orchestration import get_client

    async def summaries() -> dict:
        async with get_client() as client:
            runs = {state.state_details.flow_run_id, second.state_details.flow_run_id}
            return {
                a.flow_run_id: str(a.data)
                for a in await client.read_artifacts()
                if a.flow_run_id in runs and a.key == "fedscan-run-report"
            }

    cards = asyncio.run(summaries())
    assert Path(report.report_path).name in cards[state.state_details.flow_run_id]
    card = cards[second.state_details.flow_run_id]
    assert Path(rerun.report_path).name in card and "**0 scans processed, 4 skipped" in card
    assert "| B/B-1 | denoise |" in card  # listed once, under "still failing"
    again = {s.scan_id: s.stage_record("denoise") for s in SiteStore.open(tmp_path / "A.zarr").scans()}
    assert again == first
    # asked to, it retries the known failure (which fails again: red)
    with pytest.raises(PipelineFailedError) as again_raised:
        nightly(NightlyRequest(data_root=str(tmp_path), federated=False, report=False, retry_known_failures=True))
    assert [o.scan for o in again_raised.value.report.scans] == ["B/B-1"]


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["process_scan", "on_scan_arrived"])
def test_process_scan_from_a_scanner_file(tmp_path, prefect_harness, rng, entry, device_setting_cpu, monkeypatch):
    import asyncio

    from prefect.client.orchestration import get_client

    from flows.pipeline import ProcessScanRequest, on_scan_arrived, process_scan
    from schemas.settings import get_settings
    from tasks.scanner_output import ScannerFormat, write_scanner_output

    cols = 40
    geometry = Geometry(
        beam="fan",
        detector_shape="curved",
        n_views=120,
        n_detector_cols=cols,
        n_detector_rows=2,
        detector_pitch_mm=1.5,
        source_to_isocenter_mm=400,
        source_to_detector_mm=700,
        grid=ReconGrid(nx_pixels=32, ny_pixels=32, pixel_size_mm=1.0),
    )
    p = np.full((120, 2, cols), 0.5, np.float32)
    counts = rng.poisson(1e4 * np.exp(-p)).astype(np.float32)
    src = write_scanner_output(
        tmp_path / "in",
        scan_id="fan-1",
        geometry=geometry,
        line_integrals=p,
        counts=counts,
        i0_photons=1e4,
        water_attenuation_per_mm=0.0192,
        fmt=ScannerFormat.NPY_COUNTS,
    )
    if entry == "process_scan":
        state = process_scan(
            ProcessScanRequest(source=src, site_id="S", data_root=str(tmp_path / "data")), return_state=True
        )
    else:
        monkeypatch.setenv("FEDSCAN_INCOMING", str(tmp_path / "in"))  # event payload paths must lie inside it
        get_settings.cache_clear()
        state = on_scan_arrived(str(src), "S", str(tmp_path / "data"), return_state=True)
    report = state.result()
    assert [o.ok for o in report.scans] == [True]
    (scan,) = SiteStore.open(tmp_path / "data" / "S.zarr").scans()
    assert scan.stage_record("reconstruct").metrics["device"] == "cpu"  # FEDSCAN_DEVICE, recorded where it ran
    run_id = state.state_details.flow_run_id

    async def runs() -> tuple[list, list]:
        async with get_client() as client:
            return await client.read_flow_runs(), await client.read_task_runs()

    flow_runs, task_runs = asyncio.run(runs())
    mine = [t for t in task_runs if t.flow_run_id == run_id]
    # ingest and every stage (a disabled one too) run in the entry flow's own run: no subflow (each flow run
    # costs API calls and a heartbeat-thread join at teardown)
    assert sorted(t.name.split("-")[0] for t in mine) == sorted(["ingest", *(spec.name.value for spec in PIPELINE)])
    assert not [r for r in flow_runs if r.parent_task_run_id in {t.id for t in mine}]
    scan = SiteStore.open(tmp_path / "data" / "S.zarr").scan("fan-1")
    for stage in ("ingest", "denoise", "reconstruct", "surrogate"):
        assert scan.is_done(stage), stage
    assert scan.array("volume").shape == (2, 32, 32)
    assert scan.array("surrogate").shape == (2, 32, 32)
    assert np.isfinite(scan.array("surrogate")[...]).all()
