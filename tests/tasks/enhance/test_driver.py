"""The enhance stage: batched, block-chunked inference equals per-slice inference; an interrupted write resumes;
provenance names the model; the chain runs denoise → reconstruct → enhance → surrogate with surrogate reading
``enhanced``, and with enhance off the chain is the old one with enhance reported disabled."""

from __future__ import annotations

from pathlib import Path

import dask
import numpy as np
import pytest
import torch

from schemas.enhance import EnhanceConfig
from schemas.pipeline import PipelineConfig
from schemas.stages import PIPELINE, StageName, StageState, spec_of
from tasks import stages
from tasks.enhance.model import Architecture, build_model, enhance_slices, load_checkpoint, save_checkpoint
from tasks.enhance.training import TrainSettings, build_pairs, train_enhance
from tasks.errors import InvalidInputError
from tasks.storage import ScanStore, SiteStore, missing_chunks
from tests.flows.test_pipeline_flows import make_site

CPU = torch.device("cpu")
SIZE = 32


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny network trained (Noise2Inverse, 15 steps) on a scan of another site of the same grid."""
    root = tmp_path_factory.mktemp("train")
    scan = make_site(root, site_id="T", rows=3, cols=SIZE, views=64, seed=7).scans()[0]
    g = scan.manifest.geometry
    assert g is not None
    x, y = build_pairs(
        np.asarray(scan.array("projections")[...]), g, target="noise2inverse", water_attenuation_per_mm=0.02, device=CPU
    )
    model = build_model(Architecture(channels=4, depth=2), generator=torch.Generator().manual_seed(0))
    train_enhance(
        model,
        x,
        y,
        settings=TrainSettings(steps=15, batch_size=3),
        generator=torch.Generator().manual_seed(0),
        device=CPU,
    )
    path = root / "enhance.pt"
    save_checkpoint(path, model, grid=(SIZE, SIZE), metadata={"target": "noise2inverse"})
    return path


def _reconstructed(root: Path, site_id: str = "E", rows: int = 5) -> ScanStore:
    scan = make_site(root, site_id=site_id, rows=rows, cols=SIZE, views=64).scans()[0]
    config = PipelineConfig()
    for name in (StageName.DENOISE, StageName.RECONSTRUCT):
        assert stages.run_scan_stage(scan, name, config.stage_config(name), device=CPU).state is StageState.DONE
    return scan


def test_block_chunked_batched_inference_equals_per_slice(tmp_path: Path, checkpoint: Path) -> None:
    scan = _reconstructed(tmp_path)
    config = EnhanceConfig(model_path=str(checkpoint), batch_slices=2, slice_block=3)  # blocks 3 + 2, batches 2 + 1
    run = stages.run_scan_stage(scan, "enhance", config, device=CPU)
    assert run.state is StageState.DONE and run.record is not None
    ckpt = load_checkpoint(checkpoint)
    volume = np.asarray(scan.array("volume")[...])
    per_slice = enhance_slices(ckpt.model(device=CPU), volume, batch_size=1, device=CPU)
    enhanced = np.asarray(scan.array("enhanced")[...])
    assert scan.array("enhanced").chunks == (3, SIZE, SIZE)
    np.testing.assert_allclose(enhanced, per_slice, rtol=0, atol=1e-2)  # HU
    assert np.abs(enhanced - volume).max() > 1.0  # the trained network changed the images
    assert run.record.metrics["model_sha256"] == ckpt.sha256
    assert run.record.metrics["device"] == "cpu"
    assert "enhanced" in run.record.outputs
    assert scan.array("enhanced").attrs["model_sha256"] == ckpt.sha256
    assert run.record.inputs == {"reconstruct": scan.stage_record("reconstruct").lineage()}
    assert stages.run_scan_stage(scan, "enhance", config, device=CPU).state is StageState.SKIPPED


def test_an_interrupted_write_resumes(tmp_path: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tasks.storage as storage

    scan = _reconstructed(tmp_path)
    config = EnhanceConfig(model_path=str(checkpoint), slice_block=2)  # 3 chunks
    real, calls = storage._write_block, {"n": 0}

    def flaky(*args: object) -> object:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real(*args)

    monkeypatch.setattr(storage, "_write_block", flaky)
    with dask.config.set(scheduler="synchronous"), pytest.raises(OSError):  # or its StoreWriteError wrapping
        stages.run_scan_stage(scan, "enhance", config, device=CPU)
    assert 0 < missing_chunks(scan.array("enhanced")) < 3
    assert not scan.is_done("enhance")
    monkeypatch.setattr(storage, "_write_block", real)
    run = stages.run_scan_stage(scan, "enhance", config, device=CPU)
    assert run.state is StageState.DONE and run.result is not None
    assert run.result.chunks_present >= 1 and run.result.chunks_written + run.result.chunks_present == 3
    ckpt = load_checkpoint(checkpoint)
    expected = enhance_slices(ckpt.model(device=CPU), np.asarray(scan.array("volume")[...]), batch_size=8, device=CPU)
    np.testing.assert_allclose(scan.array("enhanced")[...], expected, rtol=0, atol=1e-2)


def test_a_model_of_another_grid_or_version_or_a_volume_not_in_hu_is_refused(tmp_path: Path, checkpoint: Path) -> None:
    scan = _reconstructed(tmp_path)
    other = tmp_path / "grid48.pt"
    save_checkpoint(other, build_model(Architecture(channels=4, depth=2)), grid=(48, 48))
    with pytest.raises(InvalidInputError, match=r"trained on a 48x48 grid; this volume is \(5, 32, 32\)"):
        stages.run_scan_stage(scan, "enhance", EnhanceConfig(model_path=str(other)), device=CPU)
    pinned = EnhanceConfig(model_path=str(checkpoint), model_sha256="0" * 64)
    with pytest.raises(InvalidInputError, match="the config pins 000000000000"):
        stages.run_scan_stage(scan, "enhance", pinned, device=CPU)
    recon = PipelineConfig().reconstruct.model_copy(update={"output_unit": "attenuation"})
    stages.run_scan_stage(scan, "reconstruct", recon, device=CPU)
    with pytest.raises(InvalidInputError, match="enhance reads HU slices; its 'volume' is in '1/mm'"):
        stages.run_scan_stage(scan, "enhance", EnhanceConfig(model_path=str(checkpoint)), device=CPU)


def _run_chain(scan: ScanStore, config: PipelineConfig) -> dict[StageName, StageState]:
    configs = {s.name: config.stage_config(s.name) for s in PIPELINE}
    disabled = stages.disabled_stages(configs)
    return {
        s.name: stages.run_scan_stage(scan, s.name, configs[s.name], device=CPU, disabled=disabled).state
        for s in PIPELINE
    }


def test_the_chain_with_enhance_on_and_off(tmp_path: Path, checkpoint: Path) -> None:
    assert [s.name for s in PIPELINE].index(StageName.ENHANCE) == [s.name for s in PIPELINE].index(
        StageName.RECONSTRUCT
    ) + 1
    assert spec_of("surrogate").reads == ("enhanced", "volume")
    scan = make_site(tmp_path, site_id="C", rows=2, cols=SIZE, views=64).scans()[0]
    on = PipelineConfig(enhance=EnhanceConfig(model_path=str(checkpoint)))
    expected = dict.fromkeys([s.name for s in PIPELINE], StageState.DONE)
    expected[StageName.DIAGNOSE] = StageState.NOT_APPLICABLE  # no promoted diagnostic model
    assert _run_chain(scan, on) == expected
    surrogate = scan.stage_record("surrogate")
    assert surrogate.inputs == {"enhance": scan.stage_record("enhance").lineage()}  # surrogate read `enhanced`
    assert stages.source_of(scan, spec_of("surrogate"))[0] == "enhanced"

    off = PipelineConfig()  # the default: no model, enhance disabled, surrogate reads the reconstruction again
    assert not off.enhance.enabled
    states = _run_chain(scan, off)
    assert states[StageName.ENHANCE] is StageState.DISABLED
    assert states[StageName.SURROGATE] is StageState.DONE  # its input changed: recomputed from `volume`
    assert scan.stage_record("surrogate").inputs == {"reconstruct": scan.stage_record("reconstruct").lineage()}
    assert states[StageName.DENOISE] is states[StageName.RECONSTRUCT] is StageState.SKIPPED
    assert "enhanced" in scan.array_names()  # the stale output stays, unread


def test_enhance_applies_to_an_image_only_scan(tmp_path: Path, checkpoint: Path) -> None:
    from tests.tasks.test_stages import add_image_scan

    site = SiteStore.create(tmp_path / "H.zarr", site_id="H")
    add_image_scan(site, size=SIZE)
    scan = site.scan("img-1")
    states = _run_chain(scan, PipelineConfig(enhance=EnhanceConfig(model_path=str(checkpoint))))
    assert states[StageName.ENHANCE] is StageState.DONE and states[StageName.SURROGATE] is StageState.DONE
    assert scan.stage_record("surrogate").inputs == {"enhance": scan.stage_record("enhance").lineage()}


@pytest.mark.gpu
def test_cuda_inference_matches_the_cpu(tmp_path: Path, checkpoint: Path) -> None:
    scan = _reconstructed(tmp_path)
    run = stages.run_scan_stage(scan, "enhance", EnhanceConfig(model_path=str(checkpoint)), device=torch.device("cuda"))
    assert run.record is not None and run.record.metrics["device"] == "cuda"
    ckpt = load_checkpoint(checkpoint)
    cpu = enhance_slices(ckpt.model(device=CPU), np.asarray(scan.array("volume")[...]), batch_size=1, device=CPU)
    # cuDNN may use TF32 for convolutions: agreement to a few HU, not bit-identity
    np.testing.assert_allclose(scan.array("enhanced")[...], cpu, rtol=0, atol=5.0)


def test_a_silobn_checkpoint_gets_each_scan_s_own_statistics(tmp_path: Path) -> None:
    """A checkpoint whose BatchNorm statistics stayed at the training sites: the stage re-estimates them on the
    scan it enhances (one slice per pass), so the result does not depend on batch_slices or slice_block."""
    from tasks.enhance.model import BN_STATISTICS_KEY

    net = build_model(Architecture(channels=4, depth=1, norm="batch"), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        net.head.weight.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(2))
    path = tmp_path / "silobn.pt"
    save_checkpoint(path, net, grid=(SIZE, SIZE), metadata={BN_STATISTICS_KEY: "site-local"})
    ckpt = load_checkpoint(path)
    assert ckpt.site_local_statistics
    scan = _reconstructed(tmp_path)
    volume = np.asarray(scan.array("volume")[...])
    expected = enhance_slices(
        ckpt.with_statistics_from(volume, device=CPU).model(device=CPU), volume, batch_size=1, device=CPU
    )
    as_saved = enhance_slices(ckpt.model(device=CPU), volume, batch_size=1, device=CPU)
    assert np.abs(expected - as_saved).max() > 1.0  # the scan's statistics differ from the file's defaults
    run = stages.run_scan_stage(
        scan, "enhance", EnhanceConfig(model_path=str(path), batch_slices=2, slice_block=3), device=CPU
    )
    assert run.record is not None and run.record.metrics["bn_statistics"] == "this scan's"
    assert run.record.metrics["model_sha256"] == ckpt.sha256  # the model version is the file's
    np.testing.assert_allclose(np.asarray(scan.array("enhanced")[...]), expected, rtol=0, atol=1e-2)
