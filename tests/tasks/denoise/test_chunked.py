"""Chunked driver: equal to the whole-array kernel for any chunking (Hypothesis), σ and errors chunk-invariant."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.denoise import DenoiseConfig, DenoiseDomain, ViewBoundary
from schemas.geometry import Geometry
from tasks.denoise.chunked import denoise_dask, estimate_noise_sigma_dask, merge_short_chunks
from tasks.denoise.kernels import denoise_projections, estimate_noise_sigma_of, resolve_group_size
from tasks.errors import InvalidInputError

N_VIEWS, ROWS, COLS = 45, 3, 20
CONFIGS = {
    "best-log": DenoiseConfig(
        domain=DenoiseDomain.LOG,
        views_per_group=8,
        view_stride=2,
        tile_cols=8,
        tile_stride_cols=4,
    ),
    # t from the angular step: 45 views over 360 deg (or 180) resolve to t = 4, stride 1 (halo 6)
    "best-log-span": DenoiseConfig(domain=DenoiseDomain.LOG, group_span_deg=4.0, tile_cols=8, tile_stride_cols=4),
    "paper": DenoiseConfig.paper(views_per_group=6),  # 45 views: groups not aligned with the scan's end
    # detector-row tiles (2 rows, stride 1) over 3 rows: tiles mirrored past the last row, rows chunked anyhow
    "row-tiles": DenoiseConfig(views_per_group=4, view_stride=2, tile_rows=2, tile_stride_rows=1, tile_cols=8),
    "anscombe-one-pass": DenoiseConfig(
        views_per_group=4, view_stride=4, tile_cols=5, tile_stride_cols=None, second_pass=False
    ),
}


def _scan(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    views = np.arange(N_VIEWS)[:, None, None]
    cols = np.arange(COLS)[None, None, :]
    p = 1.0 + 0.8 * np.exp(-(((cols - 10 - 4 * np.sin(views / 7.0)) / 4.0) ** 2)) + 0.1 * rng.random((1, ROWS, 1))
    counts = np.maximum(rng.poisson(2e3 * np.exp(-p)), 0.5)
    return np.log(2e3 / counts).astype(np.float32)


SCAN = _scan(7)


def _geometry(range_deg: float) -> Geometry:
    return Geometry(
        beam="parallel",
        n_views=N_VIEWS,
        angular_range_deg=range_deg,
        n_detector_cols=COLS,
        n_detector_rows=ROWS,
        detector_pitch_mm=1.0,
        grid={"nx_pixels": 8, "ny_pixels": 8, "pixel_size_mm": 1.0},
    )


@st.composite
def chunkings(draw: st.DrawFn, n: int) -> tuple[int, ...]:
    """Random chunk lengths along one axis summing to n: uneven last chunk, chunks of 1, chunks < t."""
    sizes: list[int] = []
    left = n
    while left > 0:
        size = draw(st.integers(min_value=1, max_value=left))
        sizes.append(size)
        left -= size
    return tuple(sizes)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("range_deg", [360.0, 180.0], ids=["periodic", "mirrored"])
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(view_chunks=chunkings(N_VIEWS), row_chunks=chunkings(ROWS), col_chunks=chunkings(COLS))
def test_chunked_equals_whole_array(
    name: str,
    range_deg: float,
    view_chunks: tuple[int, ...],
    row_chunks: tuple[int, ...],
    col_chunks: tuple[int, ...],
) -> None:
    config = CONFIGS[name]
    geometry = _geometry(range_deg)
    resolved = resolve_group_size(config, geometry)
    whole = denoise_projections(SCAN, config=resolved, periodic=geometry.is_full_circle, i0_photons=2e3)
    lazy, record = denoise_dask(
        da.from_array(SCAN, chunks=(view_chunks, row_chunks, col_chunks)),
        config=config,
        geometry=geometry,
        i0_photons=2e3,
    )
    assert record.periodic_views is geometry.is_full_circle
    assert record.view_halo == resolved.view_halo
    assert (record.views_per_group, record.view_stride) == (resolved.views_per_group, resolved.view_stride)
    assert record.config_hash == config.config_hash()
    with dask.config.set(scheduler="sync"):
        result = lazy.compute()
    np.testing.assert_allclose(result, whole, rtol=0, atol=2e-5)


def test_denoising_does_something_on_the_scan() -> None:
    """Guard against a trivially passing equality (identity on both sides)."""
    config = CONFIGS["best-log"]
    whole = denoise_projections(SCAN, config=config, periodic=True)
    assert float(np.abs(whole - SCAN).mean()) > 0.01


@pytest.mark.parametrize("name", list(CONFIGS))
def test_noise_sigma_does_not_depend_on_chunking(name: str) -> None:
    config = CONFIGS[name]
    expected = estimate_noise_sigma_of(SCAN, config=config, i0_photons=2e3)
    for chunks in [(45,), (1,) * 45, (7, 30, 8)]:
        x = da.from_array(SCAN, chunks=(chunks, 2, 7))
        assert estimate_noise_sigma_dask(x, config=config, i0_photons=2e3) == pytest.approx(expected, rel=1e-12)


def test_graph_is_lazy_and_keeps_chunks() -> None:
    x = da.from_array(SCAN, chunks=(10, ROWS, COLS))
    lazy, _ = denoise_dask(x, config=CONFIGS["paper"], geometry=_geometry(360.0), noise_sigma=0.05)
    assert isinstance(lazy, da.Array)
    assert lazy.shape == SCAN.shape and lazy.dtype == np.float32
    assert lazy.chunks[0] == (10, 10, 10, 10, 5)


def test_merge_short_chunks() -> None:
    assert merge_short_chunks((3, 3, 3, 1), minimum=3) == (3, 3, 4)
    assert merge_short_chunks((1, 1, 1, 1, 1), minimum=2) == (2, 3)
    assert merge_short_chunks((2,), minimum=5) == (2,)
    assert sum(merge_short_chunks((5, 1, 7, 2, 2), minimum=4)) == 17


def test_periodic_boundary_for_a_partial_scan_is_refused() -> None:
    config = CONFIGS["paper"].model_copy(update={"view_boundary": ViewBoundary.PERIODIC})
    with pytest.raises(InvalidInputError, match="full-circle"):
        denoise_dask(da.from_array(SCAN, chunks=10), config=config, geometry=_geometry(180.0))


def test_nan_is_reported_with_its_absolute_view_when_computed() -> None:
    bad = SCAN.copy()
    bad[33, 2, 4] = np.nan
    lazy, _ = denoise_dask(
        da.from_array(bad, chunks=(10, ROWS, COLS)), config=CONFIGS["paper"], geometry=None, noise_sigma=0.05
    )
    with pytest.raises(InvalidInputError, match="view 33, row 2"), dask.config.set(scheduler="sync"):
        lazy.compute()


def test_too_few_views_and_bad_shapes_are_refused() -> None:
    with pytest.raises(InvalidInputError, match="fewer than views_per_group"):
        denoise_dask(da.from_array(SCAN[:5]), config=CONFIGS["best-log"])
    with pytest.raises(InvalidInputError, match="views, rows, cols"):
        denoise_dask(da.from_array(SCAN[:, 0]), config=CONFIGS["best-log"])
    with pytest.raises(InvalidInputError, match="i0_photons"):
        denoise_dask(da.from_array(SCAN), config=CONFIGS["anscombe-one-pass"])
    with pytest.raises(InvalidInputError, match="empty"):
        denoise_dask(da.from_array(SCAN[:, :0]), config=CONFIGS["best-log"])
