"""DenoiseConfig: constraints, presets and the config hash."""

from __future__ import annotations

import hashlib
import json

import pytest
from pydantic import ValidationError

from schemas.denoise import DenoiseConfig, DenoiseDomain, ThresholdMode


def test_defaults_are_valid_and_frozen() -> None:
    config = DenoiseConfig()
    with pytest.raises(ValidationError):
        config.views_per_group = 4  # type: ignore[misc]
    with pytest.raises(ValidationError, match="extra"):
        DenoiseConfig(unknown_field=1)  # type: ignore[call-arg]


def test_config_hash_is_sha256_of_canonical_json() -> None:
    config = DenoiseConfig(views_per_group=8, view_stride=2)
    canonical = json.dumps(config.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    assert config.config_hash() == hashlib.sha256(canonical.encode()).hexdigest()[:16]
    assert config.config_hash() != DenoiseConfig().config_hash()
    assert config.config_hash() == DenoiseConfig(view_stride=2, views_per_group=8).config_hash()


def test_paper_preset_is_non_overlapping_rank1_whole_views() -> None:
    paper = DenoiseConfig.paper(views_per_group=10)
    assert paper.view_stride == paper.views_per_group == 10
    assert paper.tile_rows is None and paper.tile_cols is None
    assert paper.threshold_mode is ThresholdMode.RELATIVE and paper.threshold_value == 1.0
    assert paper.domain is DenoiseDomain.LOG and not paper.second_pass
    assert paper.view_halo == 9
    assert DenoiseConfig().view_halo == 2 * (DenoiseConfig().group_size - 1) == 30  # nominal t = 16 until resolved


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"views_per_group": 16, "view_stride": 5}, "must divide views_per_group"),
        ({"views_per_group": 8, "view_stride": 16}, "must divide views_per_group"),
        ({"tile_cols": 16, "tile_stride_cols": 6}, "must divide tile_cols"),
        ({"tile_cols": None, "tile_stride_cols": 4}, "needs tile_cols"),
        ({"threshold_mode": "relative", "threshold_value": 1.5}, "fraction of the leading"),
        ({"threshold_mode": "auto", "threshold_value": 20.0}, "multiplies the noise"),
        ({"views_per_group": 1}, "greater than or equal to 2"),
        ({"threshold_value": float("nan")}, "finite"),
        ({"device": "cpu"}, "Extra inputs are not permitted"),  # a run setting, not part of the config
        ({"domain": "sqrt"}, "'log' or 'anscombe'"),
    ],
)
def test_bad_values_are_refused(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        DenoiseConfig.model_validate(fields)


def test_group_size_follows_the_angular_step() -> None:
    """'auto': t is the power of two nearest span/step (clamped), the stride keeps its ratio, no geometry: the
    nominal 16; a number: used as given, whatever the span."""
    from schemas.geometry import Geometry
    from tasks.denoise.kernels import resolve_group_size

    def geometry(views: int, degrees: float) -> Geometry:
        return Geometry(
            beam="parallel",
            n_views=views,
            angular_range_deg=degrees,
            n_detector_cols=8,
            detector_pitch_mm=1.0,
            grid={"nx_pixels": 8, "ny_pixels": 8, "pixel_size_mm": 1.0},
        )

    config = DenoiseConfig(views_per_group="auto", view_stride=4, group_span_deg=4.0)
    assert DenoiseConfig().views_per_group == "auto"  # the default, stated
    fine = resolve_group_size(config, geometry(1440, 360.0))  # 0.25 deg per view -> 16 views
    coarse = resolve_group_size(config, geometry(360, 360.0))  # 1 deg -> 4 views
    assert (fine.views_per_group, fine.view_stride) == (16, 4)
    assert (coarse.views_per_group, coarse.view_stride) == (4, 1)
    assert coarse.view_halo == 6  # the halo follows the resolved t
    assert resolve_group_size(config, geometry(36, 360.0)).views_per_group == 4  # 10 deg per view: clamped
    assert resolve_group_size(config, geometry(7200, 360.0)).views_per_group == 32  # 0.05 deg: clamped
    nominal = resolve_group_size(config, None)
    assert (nominal.views_per_group, nominal.view_stride) == (16, 4)
    fixed = config.model_copy(update={"views_per_group": 16})
    assert resolve_group_size(fixed, geometry(360, 360.0)) == fixed  # a number is never replaced
    with pytest.raises(ValidationError, match="views_per_group"):
        DenoiseConfig(views_per_group="sometimes")
    assert resolve_group_size(DenoiseConfig.paper(), geometry(360, 360.0)).views_per_group == 8  # paper: as given
