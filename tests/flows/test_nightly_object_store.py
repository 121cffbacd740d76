"""The nightly flow over an S3 data root (moto's S3 server on 127.0.0.1): discovery, stages and report."""

from __future__ import annotations

import pytest

from tests.flows.test_pipeline_flows import make_site


@pytest.mark.slow
def test_nightly_over_an_s3_data_root_processes_a_site(tmp_path, s3_bucket, prefect_harness, device_setting_cpu):
    import s3fs

    from flows.pipeline import NightlyRequest, nightly
    from tasks.storage import SiteStore

    make_site(tmp_path / "local", site_id="A", n_scans=1, views=60, cols=32)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    root = f"{s3_bucket}/data"
    fs.put(str(tmp_path / "local" / "A.zarr"), f"{root.removeprefix('s3://')}/A.zarr", recursive=True)

    report = nightly(NightlyRequest(data_root=root, federated=False))
    assert [(o.scan, o.ok) for o in report.scans] == [("A/A-0", True)]
    scan = SiteStore.open(f"{root}/A.zarr", mode="r").scan("A-0")
    for stage in ("denoise", "reconstruct", "surrogate"):
        assert scan.is_done(stage), stage
    assert report.report_path is not None and report.report_path.startswith(f"{root}/reports/report-")
    html = fs.cat(report.report_path.removeprefix("s3://")).decode()
    assert "1 scans processed, 0 skipped" in html
    # a second night finds nothing left to do there
    assert nightly(NightlyRequest(data_root=root, federated=False, report=False)).scans == ()
