"""`fedscan demo --enhance` on tiny sites: the sites train the enhance network federally, then every scan goes
through it (provenance naming the model's sha256) and the site-only report shows raw / classical / enhanced."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

import pytest
from rich.console import Console

from schemas.demo import DemoSize
from tasks.enhance.model import load_checkpoint
from tasks.federated.enhance_task import CURRENT_CHECKPOINT
from tasks.storage import SiteStore, find_site_stores

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.slow
@pytest.mark.integration
def test_demo_enhance_trains_federally_then_enhances_every_scan(tmp_path, prefect_harness, device_setting_cpu):
    from flows.demo import run_demo

    out = tmp_path / "demo"
    console = Console(record=True, width=200)
    report = run_demo(
        out, n_sites=2, scans_per_site=1, n_slices=4, size=DemoSize.TINY, federated=False, enhance=True, console=console
    )
    current = out / "models" / CURRENT_CHECKPOINT
    checkpoint = load_checkpoint(current, grid=(32, 32))
    assert checkpoint.metadata["round"] == 3  # the demo's training ran all its rounds
    assert not report.failed
    assert {o.scan: o.stages["enhance"] for o in report.scans} == {"A/A-0000": "done", "B/B-0000": "done"}
    for path in find_site_stores(str(out)):
        for scan in SiteStore.open(path, mode="r").scans():
            enhanced = scan.stage_record("enhance")
            assert enhanced is not None and enhanced.metrics["model_sha256"] == checkpoint.sha256
            surrogate = scan.stage_record("surrogate")
            assert surrogate is not None and surrogate.inputs.get("enhance") == enhanced.lineage()  # from the enhanced
    page = Path(report.report_path or "").read_text(encoding="utf-8")
    shown = re.findall(r"<img alt='([^']*raw / classical / enhanced[^']*)' src='data:image/png;base64,([^']+)'>", page)
    assert sorted(html.unescape(alt).split("/")[0] for alt, _ in shown) == ["A", "B"]  # one comparison per site
    assert all(base64.b64decode(data).startswith(b"\x89PNG") for _, data in shown)
    assert all("PSNR against the truth: raw FBP" in html.unescape(alt) for alt, _ in shown)  # the caption's scores
    printed = console.export_text()
    assert str(current.resolve()) in printed and str(report.report_path) in printed
