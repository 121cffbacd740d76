"""A scan whose metadata document is corrupt fails alone, named; the nightly goes on with the site's other scans."""

from __future__ import annotations

import pytest

from tests.flows.test_pipeline_flows import make_site


@pytest.mark.slow
def test_a_corrupt_scan_document_fails_that_scan_only(tmp_path, prefect_harness, device_setting_cpu):
    from flows.pipeline import NightlyRequest, PipelineFailedError, nightly

    make_site(tmp_path, site_id="C", n_scans=2)
    (tmp_path / "C.zarr" / "scans" / "C-1" / "zarr.json").write_text('{"zarr_format": 3, "node_type": ')
    with pytest.raises(PipelineFailedError) as raised:
        nightly(NightlyRequest(data_root=str(tmp_path), federated=False, report=False))
    outcomes = {o.scan: o for o in raised.value.report.scans}
    assert outcomes["C/C-0"].ok
    assert outcomes["C/C-1"].failed_stage == "denoise"
    assert "zarr.json" in (outcomes["C/C-1"].error or "")
    assert "C/C-1 in denoise" in str(raised.value)
