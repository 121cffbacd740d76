"""FEDSCAN_DEVICE reaches the stages whose own config names no device."""

from __future__ import annotations

import pytest
import torch

from flows.pipeline import with_settings_device
from schemas.pipeline import PipelineConfig
from schemas.settings import Device, FedscanSettings
from tasks.errors import DeviceUnavailableError


def test_stages_without_their_own_device_take_the_settings_one() -> None:
    config = PipelineConfig()
    on_cpu = with_settings_device(config, Device.CPU)
    assert (on_cpu.denoise.device, on_cpu.reconstruct.device, on_cpu.surrogate.device) == ("cpu", "cpu", "cpu")
    # everything else is untouched
    assert on_cpu.denoise.model_dump(exclude={"device"}) == config.denoise.model_dump(exclude={"device"})
    assert on_cpu.federation == config.federation


def test_a_stage_that_names_its_device_keeps_it() -> None:
    config = PipelineConfig.model_validate({"surrogate": {"device": "cuda"}, "reconstruct": {"device": "cuda"}})
    got = with_settings_device(config, Device.CPU)
    assert got.surrogate.device == "cuda"  # not overridden by the settings
    assert got.reconstruct.device == "cuda"
    assert got.denoise.device == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")
def test_auto_without_a_gpu_keeps_every_default_config_hash() -> None:
    assert FedscanSettings.model_fields["device"].default is Device.AUTO  # FEDSCAN_DEVICE unset
    config = PipelineConfig()
    got = with_settings_device(config, Device.AUTO)
    assert got.denoise.config_hash() == config.denoise.config_hash()
    assert got.reconstruct.config_hash() == config.reconstruct.config_hash()  # stays "auto"
    assert got.surrogate.config_hash() == config.surrogate.config_hash()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")
def test_cuda_without_a_gpu_is_refused_before_any_scan_unless_no_stage_uses_it() -> None:
    with pytest.raises(DeviceUnavailableError, match="no CUDA device"):
        with_settings_device(PipelineConfig(), "cuda")
    pinned = PipelineConfig.model_validate({k: {"device": "cpu"} for k in ("denoise", "reconstruct", "surrogate")})
    assert with_settings_device(pinned, "cuda") == pinned


def test_auto_with_a_gpu_puts_every_stage_on_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # what a machine with a GPU answers
    got = with_settings_device(PipelineConfig(), Device.AUTO)
    assert (got.denoise.device, got.reconstruct.device, got.surrogate.device) == ("cuda", "auto", "cuda")
