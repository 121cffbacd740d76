"""Training pairs: the Noise2Inverse view split is disjoint, covering and deterministic; each split is a regular
scan whose FBPs average to the full FBP; binomial thinning keeps Poisson statistics and gives independent
complementary halves; too few views are refused naming the count."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from schemas.geometry import Geometry, ReconGrid
from tasks.enhance.pairs import (
    counts_to_line_integrals,
    noise2inverse_pairs,
    reconstruct_splits,
    split_geometry,
    split_views,
    thin_counts,
)
from tasks.errors import InvalidInputError
from tasks.reconstruct.kernels import fbp, forward_project

CPU = torch.device("cpu")
GRID = ReconGrid(nx_pixels=32, ny_pixels=32, pixel_size_mm=1.0)


def _geometries() -> list[Geometry]:
    return [
        Geometry(
            beam="parallel", n_views=48, angular_range_deg=180.0, n_detector_cols=48, detector_pitch_mm=1.0, grid=GRID
        ),
        Geometry(
            beam="fan",
            detector_shape="curved",
            n_views=64,
            start_angle_deg=90.0,
            n_detector_cols=64,
            detector_pitch_mm=1.2,
            source_to_isocenter_mm=200.0,
            source_to_detector_mm=360.0,
            grid=GRID,
        ),
    ]


@pytest.mark.parametrize(("n", "k"), [(16, 2), (48, 2), (48, 3), (720, 4)])
def test_split_is_disjoint_covering_and_deterministic(n: int, k: int) -> None:
    subsets = split_views(n, k=k)
    assert len(subsets) == k
    joined = np.concatenate(subsets)
    assert sorted(joined.tolist()) == list(range(n))  # covering and disjoint
    assert all(len(s) == n // k for s in subsets)
    assert all(np.array_equal(a, b) for a, b in zip(subsets, split_views(n, k=k), strict=True))
    assert all(np.all(np.diff(s) == k) for s in subsets)  # interleaved: each a regular scan


@pytest.mark.parametrize(
    ("n", "k", "match"), [(14, 2, "14 views has too few"), (7, 1, "k >= 2"), (49, 2, "49 is not a multiple")]
)
def test_bad_splits_are_refused_by_name(n: int, k: int, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        split_views(n, k=k)


@pytest.mark.parametrize("geometry", _geometries(), ids=["parallel-180", "fan-curved-360"])
def test_split_geometry_has_the_subsets_view_angles(geometry: Geometry) -> None:
    angles = np.array(geometry.view_angles_deg())
    for j, views in enumerate(split_views(geometry.n_views, k=2)):
        sub = split_geometry(geometry, k=2, j=j)
        np.testing.assert_allclose(sub.view_angles_deg(), angles[views], atol=1e-9)


@pytest.mark.parametrize("geometry", _geometries(), ids=["parallel-180", "fan-curved-360"])
def test_split_fbps_average_to_the_full_fbp_and_carry_independent_noise(geometry: Geometry) -> None:
    yy, xx = np.mgrid[:32, :32] - 15.5
    image = (np.hypot(yy, xx) < 10).astype(np.float32) * 0.02
    g = geometry.model_copy(update={"n_detector_rows": 2})
    clean = np.asarray(forward_project(np.stack([image, image]), g, device=CPU))  # (slices, views, cols)
    rng = np.random.default_rng(0)
    noisy = clean + rng.normal(0, 0.05, clean.shape).astype(np.float32)
    projections = noisy.transpose(1, 0, 2)  # storage layout (views, rows, cols)
    splits = reconstruct_splits(projections, g, k=2, filter_name="hann", device=CPU)
    assert splits.shape == (2, 2, 32, 32)
    full = np.asarray(fbp(noisy, g, filter_name="hann", device=CPU))
    inside = np.hypot(yy, xx) < 12
    np.testing.assert_allclose(splits.mean(axis=0)[:, inside], full[:, inside], atol=2e-3)  # 10 % of the disc
    reference = np.asarray(fbp(clean, g, filter_name="hann", device=CPU))
    e0, e1 = (splits[0] - reference)[:, inside], (splits[1] - reference)[:, inside]
    assert abs(np.corrcoef(e0.ravel(), e1.ravel())[0, 1]) < 0.15  # independent noise across splits
    inputs, targets = noise2inverse_pairs(splits)
    np.testing.assert_array_equal(inputs[:2], splits[1])
    np.testing.assert_array_equal(targets[:2], splits[0])


def test_fan_short_scans_are_refused() -> None:
    g = _geometries()[1].model_copy(update={"angular_range_deg": 240.0})
    with pytest.raises(InvalidInputError, match="short scan"):
        split_geometry(g, k=2, j=0)


def test_thinning_keeps_poisson_mean_and_variance_and_splits_independently() -> None:
    lam, f = 200.0, 0.3
    counts = np.random.default_rng(1).poisson(lam, size=200_000).astype(np.float32)
    kept, rest = thin_counts(counts, fraction=f, rng=np.random.default_rng(2))
    np.testing.assert_array_equal(kept + rest, counts)
    assert kept.mean() == pytest.approx(f * lam, rel=0.01)
    assert kept.var() == pytest.approx(f * lam, rel=0.03)  # Poisson: variance = mean
    assert rest.mean() == pytest.approx((1 - f) * lam, rel=0.01)
    assert rest.var() == pytest.approx((1 - f) * lam, rel=0.03)
    assert abs(np.corrcoef(kept, rest)[0, 1]) < 0.01  # complementary halves are independent
    again, _ = thin_counts(counts, fraction=f, rng=np.random.default_rng(2))
    np.testing.assert_array_equal(again, kept)
    lines = counts_to_line_integrals(kept, i0_photons=f * 1000.0)
    np.testing.assert_allclose(lines.mean(), np.log(1000.0 / lam), atol=0.01)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5])
def test_thinning_fraction_outside_the_open_interval_is_refused(fraction: float) -> None:
    with pytest.raises(InvalidInputError, match="fraction"):
        thin_counts(np.ones(4), fraction=fraction, rng=np.random.default_rng(0))
