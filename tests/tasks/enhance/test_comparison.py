"""The site-only report's enhance picture: raw FBP / classical / enhanced of one slice, plaintext, in report.html
and never in what a shared summary may carry under the default policy."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from schemas.enhance import EnhanceConfig
from schemas.pipeline import PipelineConfig
from schemas.settings import PrivacySettings
from schemas.stages import StageName, StageState
from tasks import stages
from tasks.enhance.comparison import enhance_comparison, enhance_comparisons
from tasks.enhance.model import Architecture, build_model, save_checkpoint
from tasks.previews import shareable_previews
from tests.flows.test_pipeline_flows import make_site

CPU = torch.device("cpu")
SIZE = 32


def test_raw_classical_and_enhanced_side_by_side_site_only(tmp_path: Path) -> None:
    model = build_model(Architecture(channels=4, depth=1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.head.bias.fill_(0.05)  # not the identity: the enhanced panel differs from the classical one
    ckpt = tmp_path / "enhance.pt"
    save_checkpoint(ckpt, model, grid=(SIZE, SIZE))
    scan = make_site(tmp_path, site_id="S", rows=3, cols=SIZE, views=64).scans()[0]
    config = PipelineConfig(enhance=EnhanceConfig(model_path=str(ckpt)))
    for name in (StageName.DENOISE, StageName.RECONSTRUCT):
        assert stages.run_scan_stage(scan, name, config.stage_config(name), device=CPU).state is StageState.DONE
    assert enhance_comparison(scan) is None  # nothing to compare before the stage ran
    run = stages.run_scan_stage(scan, StageName.ENHANCE, config.stage_config(StageName.ENHANCE), device=CPU)
    assert run.state is StageState.DONE

    (preview,) = enhance_comparisons(str(tmp_path))
    assert preview.plaintext and "raw / classical / enhanced" in preview.title
    image = np.asarray(Image.open(io.BytesIO(preview.png)))
    assert image.shape[1] == 3 * 256  # raw FBP, classical (denoised FBP), enhanced: one 256-px tile each
    tiles = [image[18:, 256 * i : 256 * (i + 1)].astype(float) for i in range(3)]
    assert np.abs(tiles[2] - tiles[1]).mean() > 0.5  # the enhanced panel is the network's output, not a copy
    assert shareable_previews([preview], PrivacySettings()) == []  # plaintext: stays at the site by default

    from tasks.pipeline_support import publish_run_report

    report = Path(publish_run_report(str(tmp_path), [], None) or "")
    assert "raw / classical / enhanced" in report.read_text()
