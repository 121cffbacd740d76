"""Where a stage runs is a run setting: FEDSCAN_DEVICE or the config's ``device``, resolved once per run, recorded in
provenance and never part of a stage's config hash."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flows.pipeline import resolve_run
from schemas.pipeline import PipelineConfig
from schemas.settings import Device, FedscanSettings
from schemas.stages import PIPELINE, StageName, StageState
from tasks.errors import DeviceUnavailableError
from tasks.stages import run_scan_stage


@pytest.fixture
def fedscan_device(fedscan_env):
    return lambda value: fedscan_env(DEVICE=value)


def test_no_stage_config_carries_a_device() -> None:
    for spec in PIPELINE:
        assert "device" not in spec.config_type.model_fields, spec.name
    with pytest.raises(ValueError, match="device"):  # an old config naming one is refused, not ignored
        PipelineConfig.model_validate({"denoise": {"device": "cpu"}})


def test_the_config_device_wins_over_the_setting(fedscan_device) -> None:
    fedscan_device("cuda")
    config, device = resolve_run(PipelineConfig(device=Device.CPU), None)
    assert device == "cpu"
    assert config.device is Device.CPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")
def test_cuda_without_a_gpu_is_refused_before_any_scan(fedscan_device) -> None:
    fedscan_device("cuda")
    with pytest.raises(DeviceUnavailableError, match="no CUDA device"):
        resolve_run(PipelineConfig(), None)
    assert FedscanSettings.model_fields["device"].default is Device.AUTO


def test_auto_resolves_to_the_gpu_where_torch_sees_one(monkeypatch: pytest.MonkeyPatch, fedscan_device) -> None:
    fedscan_device("auto")
    assert resolve_run(PipelineConfig(), None)[1] == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # what a machine with a GPU answers
    assert resolve_run(PipelineConfig(), None)[1] == "cuda"


def test_work_written_on_the_cpu_is_skipped_not_redone_on_a_gpu_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fedscan_device
) -> None:
    from tests.flows.test_pipeline_flows import make_site

    scan = make_site(tmp_path, site_id="D", rows=2, cols=32, views=90).scans()[0]
    config = PipelineConfig()
    fedscan_device("cpu")
    _, cpu = resolve_run(config, None)
    # not enhance (no model path) and not diagnose (no promoted model: not-applicable, nothing written)
    enabled = [
        spec for spec in PIPELINE if config.stage_config(spec.name).enabled and spec.name is not StageName.DIAGNOSE
    ]
    diagnose = run_scan_stage(
        scan, StageName.DIAGNOSE, config.stage_config(StageName.DIAGNOSE), device=torch.device("cpu")
    )
    assert diagnose.state is StageState.NOT_APPLICABLE
    for spec in enabled:
        run = run_scan_stage(scan, spec.name, config.stage_config(spec.name), device=torch.device(cpu))
        assert run.state is StageState.DONE
        assert run.record is not None and run.record.metrics["device"] == "cpu"
    before = scan.provenance()

    # A GPU worker (auto resolves to cuda) under a config that asks for auto: same config hashes, nothing to do.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    auto_config, gpu = resolve_run(PipelineConfig(device=Device.AUTO), None)
    assert gpu == "cuda"
    for spec in enabled:
        run = run_scan_stage(scan, spec.name, auto_config.stage_config(spec.name), device=torch.device(gpu))
        assert run.state is StageState.SKIPPED, spec.name  # a redo would need CUDA, which this machine lacks
    assert scan.provenance() == before
    assert before[StageName.SURROGATE].metrics["device"] == "cpu"
