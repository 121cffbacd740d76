"""The flows walk the stage registry: each scan's chain is the registry filtered by its data kind, in order;
`fedscan run --config FILE` runs it from the pipeline's config file and refuses an unknown key by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app
from schemas.stages import PIPELINE, StageName
from tasks import stages
from tasks.storage import SiteStore
from tests.flows.test_pipeline_flows import make_site
from tests.tasks.test_stages import add_image_scan

ROOT = Path(__file__).resolve().parents[2]


def test_run_refuses_an_unknown_config_key_by_name(tmp_path: Path) -> None:
    bad = yaml.safe_load((ROOT / "configs" / "pipeline.yaml").read_text())
    bad["denoise"]["views_per_grup"] = 8
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(bad))
    result = CliRunner().invoke(app, ["run", "--config", str(path), str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert "unknown key 'denoise.views_per_grup'" in result.output
    assert str(path) in result.output
    assert len(result.output.strip().splitlines()) == 1  # one line, no traceback
    path.write_text("denoise: [1, 2]\n")
    result = CliRunner().invoke(app, ["run", "--config", str(path), str(tmp_path)])
    assert result.exit_code == 2 and "denoise" in result.output


@pytest.mark.slow
def test_run_walks_the_registry_per_data_kind(tmp_path: Path, prefect_harness, device_setting_cpu, monkeypatch) -> None:
    site = make_site(tmp_path, site_id="K", n_scans=1)
    add_image_scan(site, "img-1")
    calls: list[tuple[str, StageName]] = []
    for spec in PIPELINE:
        real = stages.STAGES[spec.name]

        def recording(scan, config, _real=real, **kwargs):
            calls.append((scan.scan_id, _real.name))
            return _real.driver(scan, config, **kwargs)

        monkeypatch.setitem(stages.STAGES, spec.name, stages.Stage(spec, recording, real.resolve))

    config = tmp_path / "pipeline.yaml"
    config.write_text((ROOT / "configs" / "pipeline.yaml").read_text())
    args = ["run", "--config", str(config), "--no-federated", "--no-report", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    # enhance: off (no model); diagnose: not-applicable (no promoted model)
    order = [spec.name for spec in PIPELINE if spec.name not in (StageName.ENHANCE, StageName.DIAGNOSE)]
    assert [name for scan, name in calls if scan == "K-0"] == order  # the registry's order
    assert [name for scan, name in calls if scan == "img-1"] == [StageName.SURROGATE]
    out = " ".join(result.output.split())  # the console wraps long lines
    assert (
        "K/img-1: ok (denoise not-applicable, reconstruct not-applicable, enhance disabled, surrogate done, diagnose not-applicable)"
        in out
    )
    assert (
        "K/K-0: ok (denoise done, reconstruct done, enhance disabled, surrogate done, diagnose not-applicable)" in out
    )
    img = SiteStore.open(tmp_path / "K.zarr").scan("img-1")
    assert set(img.provenance()) == {"ingest", "surrogate"}

    calls.clear()  # a second run: discovery finds no scan with a stage left, no driver called
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert calls == []
    assert "nothing to do" in result.output

    # under another denoise config only the projection scan has work again; its stages downstream follow
    changed = yaml.safe_load(config.read_text())
    changed["denoise"]["threshold_value"] = 2.0
    config.write_text(yaml.safe_dump(changed))
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert [name for _scan, name in calls] == order
    out = " ".join(result.output.split())
    assert (
        "K/K-0: ok (denoise done, reconstruct done, enhance disabled, surrogate done, diagnose not-applicable)" in out
    )
    assert "img-1" not in result.output


@pytest.mark.slow
def test_run_with_an_enhance_model_runs_four_stages(tmp_path: Path, prefect_harness, device_setting_cpu) -> None:
    import numpy as np
    import torch

    from tasks.enhance.model import Architecture, build_model, save_checkpoint
    from tasks.enhance.training import TrainSettings, build_pairs, train_enhance

    site = make_site(tmp_path, site_id="K", n_scans=1, cols=32, views=64)
    scan = site.scans()[0]
    assert scan.manifest.geometry is not None
    cpu = torch.device("cpu")
    x, y = build_pairs(
        np.asarray(scan.array("projections")[...]),
        scan.manifest.geometry,
        target="noise2inverse",
        water_attenuation_per_mm=scan.manifest.water_attenuation_per_mm,
        device=cpu,
    )
    model = build_model(Architecture(channels=4, depth=1), generator=torch.Generator().manual_seed(0))
    train_enhance(model, x, y, settings=TrainSettings(steps=5, batch_size=2), generator=torch.Generator(), device=cpu)
    checkpoint = tmp_path / "models" / "enhance.pt"
    sha = save_checkpoint(checkpoint, model, grid=(32, 32))
    config = yaml.safe_load((ROOT / "configs" / "pipeline.yaml").read_text())
    config["enhance"] = {"model_path": str(checkpoint), "model_sha256": sha}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    args = ["run", "--config", str(path), "--no-federated", "--no-report", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (
        "K/K-0: ok (denoise done, reconstruct done, enhance done, surrogate done, diagnose not-applicable)"
        in " ".join(result.output.split())
    )
    scan = SiteStore.open(tmp_path / "K.zarr").scan("K-0")
    assert scan.stage_record("enhance").metrics["model_sha256"] == sha
    assert scan.stage_record("surrogate").inputs == {"enhance": scan.stage_record("enhance").lineage()}


def test_inspect_shows_each_stage_state_under_the_config(tmp_path: Path) -> None:
    import torch

    from schemas.pipeline import PipelineConfig

    site = make_site(tmp_path, site_id="I", n_scans=1)
    add_image_scan(site, "img-1")
    stages.run_scan_stage(site.scan("I-0"), "denoise", PipelineConfig().denoise, device=torch.device("cpu"))
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "I.zarr")])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "chain: denoise done, reconstruct pending, enhance disabled, surrogate pending" in text
    assert "chain: denoise not-applicable, reconstruct not-applicable, enhance disabled, surrogate pending" in text
    other = tmp_path / "other.yaml"
    other.write_text("denoise:\n  threshold_value: 2.0\n")
    result = CliRunner().invoke(app, ["inspect", "--config", str(other), str(tmp_path / "I.zarr")])
    assert "chain: denoise pending, reconstruct pending" in " ".join(result.output.split())
