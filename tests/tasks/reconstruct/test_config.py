"""ReconstructConfig: limits, immutability and a stable hash."""

from __future__ import annotations

import pydantic
import pytest

from schemas.reconstruct import ReconstructConfig


def test_defaults_and_hash_are_stable_and_sensitive() -> None:
    config = ReconstructConfig()
    assert config.slice_block == 16
    assert config.config_hash() == ReconstructConfig().config_hash()
    assert len(config.config_hash()) == 16
    int(config.config_hash(), 16)
    assert ReconstructConfig(iterations=21).config_hash() != config.config_hash()
    # Field order does not matter: the JSON is canonical.
    same = ReconstructConfig.model_validate({"slice_block": 16, "method": "fbp"})
    assert same.config_hash() == config.config_hash()


@pytest.mark.parametrize(
    "bad",
    [
        {"method": "art"},
        {"frequency_cutoff": 0.0},
        {"frequency_cutoff": 1.5},
        {"relaxation": 2.0},
        {"iterations": 0},
        {"slice_block": 0},
        {"output_unit": "mu"},
        {"device": "cpu"},  # where a stage runs is a run setting, not part of its config
        {"water_attenuation_per_mm": -0.01},
        {"filter_name": "ramp"},
        {"unknown": 1},
    ],
)
def test_bad_values_are_refused(bad: dict) -> None:
    with pytest.raises(pydantic.ValidationError):
        ReconstructConfig(**bad)


def test_frozen_and_every_field_described() -> None:
    config = ReconstructConfig()
    with pytest.raises(pydantic.ValidationError):
        config.method = "sirt"  # type: ignore[misc]
    assert all(field.description for field in ReconstructConfig.model_fields.values())
