"""SurrogateConfig: constrained, frozen, hashed."""

from __future__ import annotations

import pydantic
import pytest

from schemas.surrogate import HostPolicy, IqemConfig, SurrogateConfig


def test_defaults_and_hash():
    c = SurrogateConfig()
    assert (c.alpha, c.beta, c.host_policy) == (0.1, 0.5, HostPolicy.FIXED)
    assert not c.iqem.enabled
    assert c.config_hash() == SurrogateConfig().config_hash()
    assert c.config_hash() != SurrogateConfig(beta=0.4).config_hash()
    assert c.config_hash() != SurrogateConfig(iqem=IqemConfig(enabled=True)).config_hash()
    assert len(c.config_hash()) == 16


@pytest.mark.parametrize(
    "bad",
    [
        {"alpha": 0.6},
        {"alpha": -0.1},
        {"beta": 1.01},
        {"beta": float("nan")},
        {"host_policy": "nearest"},
        {"host_pool": ()},
        {"host_pool": ("camera", "camera")},
        {"window_hu": (100.0, -100.0)},
        {"device": "cpu"},  # a run setting, not part of the config
        {"unknown_field": 1},
        {"iqem": {"steps": 0}},
    ],
)
def test_bad_values_refused(bad):
    with pytest.raises(pydantic.ValidationError):
        SurrogateConfig.model_validate(bad)


def test_frozen() -> None:
    c = SurrogateConfig()
    with pytest.raises(pydantic.ValidationError):
        c.alpha = 0.2  # type: ignore[misc]
