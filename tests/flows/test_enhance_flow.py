"""`fedscan run`'s flow with ``federation.task: enhance``: the nightly processes the scans, then the sites train the
enhance network through the Flower simulation (an image-only site skipped and named); a second run applies the
current model and the site-only report shows raw / classical / enhanced."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.enhance.model import load_checkpoint
from tasks.federated.enhance_task import CURRENT_CHECKPOINT
from tasks.storage import SiteStore
from tests.flows.test_pipeline_flows import make_site
from tests.tasks.test_stages import add_image_scan

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.slow
@pytest.mark.integration
def test_nightly_trains_the_enhance_network_then_applies_it(tmp_path, prefect_harness, device_setting_cpu):
    from flows.pipeline import NightlyRequest, nightly

    data = tmp_path / "data"
    make_site(data, site_id="A", rows=4, cols=32, views=32, i0=5e4, seed=0)
    make_site(data, site_id="B", rows=4, cols=32, views=48, i0=5e3, seed=1)
    add_image_scan(SiteStore.create(data / "H.zarr", site_id="H"), size=32)
    train = tmp_path / "train.yaml"
    train.write_text(
        "federation:\n  task: enhance\n  num_rounds: 2\n  local_epochs: 1\n  batch_size: 4\n  base_channels: 4\n"
        "  wait_for_nodes_s: 90\n  round_timeout_s: 120\n",
        encoding="utf-8",
    )
    report = nightly(NightlyRequest(data_root=str(data), config_path=str(train)))
    fed = report.federated or {}
    assert fed.get("status") == "finished:completed", fed
    assert [r["aggregated"] for r in fed["rounds"]] == [True, True]
    assert all(r["eval_psnr_db"] is not None for r in fed["rounds"])
    assert fed["skipped_sites"] == ["H: no projection scans (image-only data cannot make training pairs)"]
    current = data / "models" / CURRENT_CHECKPOINT
    assert load_checkpoint(current, grid=(32, 32)).metadata["round"] == 2
    assert "Sites the federated run skipped" in Path(report.report_path or "").read_text()

    apply = tmp_path / "apply.yaml"
    apply.write_text(f"enhance:\n  model_path: {current}\n", encoding="utf-8")
    again = nightly(NightlyRequest(data_root=str(data), config_path=str(apply), federated=False))
    assert {o.scan: o.stages["enhance"] for o in again.scans} == {"A/A-0": "done", "B/B-0": "done", "H/img-1": "done"}
    assert "raw / classical / enhanced" in Path(again.report_path or "").read_text()
