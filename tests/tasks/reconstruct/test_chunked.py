"""The slice-block driver equals the kernel on the whole array, for any chunking."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.geometry import Geometry, ReconGrid
from schemas.reconstruct import ReconstructConfig
from tasks.errors import InvalidInputError
from tasks.reconstruct.chunked import reconstruct_volume, reconstruct_with_config
from tasks.reconstruct.kernels import attenuation_to_hu, fbp, forward_project, sirt

ROWS = 7
GEOMETRY = Geometry(
    beam="parallel",
    n_views=24,
    angular_range_deg=180.0,
    n_detector_cols=24,
    detector_pitch_mm=1.0,
    n_detector_rows=ROWS,
    grid=ReconGrid(nx_pixels=16, ny_pixels=16, pixel_size_mm=1.0),
)


def projections() -> np.ndarray:
    images = np.random.default_rng(5).random((ROWS, 16, 16), dtype=np.float32) * 0.02
    return np.ascontiguousarray(np.moveaxis(forward_project(images, GEOMETRY), 0, 1))  # (views, rows, cols)


def uneven_chunks(total: int) -> st.SearchStrategy[tuple[int, ...]]:
    """Chunk sizes summing to ``total``, in any (uneven) split."""
    return st.lists(st.integers(1, total), min_size=1, max_size=total).map(
        lambda cuts: tuple(np.diff(np.unique([0, *[c for c in cuts if c < total], total])).tolist())
    )


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(block=st.integers(1, ROWS + 2), view_chunks=uneven_chunks(24), row_chunks=uneven_chunks(ROWS))
def test_chunked_fbp_equals_the_whole_array(block: int, view_chunks, row_chunks) -> None:
    proj = projections()
    lazy = da.from_array(proj, chunks=(view_chunks, row_chunks, 24))
    volume = reconstruct_volume(lazy, GEOMETRY, filter_name="shepp-logan", slice_block=block)
    assert volume.chunks[0] == tuple([block] * (ROWS // block) + ([ROWS % block] if ROWS % block else []))
    whole = fbp(np.moveaxis(proj, 1, 0), GEOMETRY, filter_name="shepp-logan")
    np.testing.assert_allclose(volume.compute(scheduler="synchronous"), whole, rtol=1e-5, atol=1e-6)


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(block=st.integers(1, ROWS))
def test_chunked_sirt_in_hu_equals_the_whole_array(block: int) -> None:
    proj = projections()
    volume = reconstruct_volume(
        da.from_array(proj, chunks=(5, 3, 24)),
        GEOMETRY,
        method="sirt",
        iterations=3,
        slice_block=block,
        output_unit="hu",
        water_attenuation_per_mm=0.02,
    )
    whole = attenuation_to_hu(sirt(np.moveaxis(proj, 1, 0), GEOMETRY, iterations=3), water_attenuation_per_mm=0.02)
    np.testing.assert_allclose(volume.compute(scheduler="threads"), whole, rtol=1e-4, atol=1e-2)


def test_building_the_graph_computes_nothing_and_the_config_path_matches() -> None:
    calls: list[int] = []  # sizes of the blocks read (dask probes with tiny arrays for meta)
    proj = da.from_array(projections(), chunks=(24, ROWS, 24)).map_blocks(lambda b: calls.append(b.size) or b)
    config = ReconstructConfig(method="fbp", filter_name="hann", slice_block=3, output_unit="attenuation")
    volume = reconstruct_with_config(proj, GEOMETRY, config)
    assert not [size for size in calls if size > 1]
    assert volume.shape == (ROWS, 16, 16)
    assert volume.dtype == np.float32
    assert volume.chunks == ((3, 3, 1), (16,), (16,))
    direct = reconstruct_volume(da.from_array(projections()), GEOMETRY, filter_name="hann", slice_block=ROWS)
    with dask.config.set(scheduler="synchronous"):
        np.testing.assert_allclose(volume.compute(), direct.compute(), rtol=1e-6, atol=1e-7)


def test_nan_in_a_later_block_names_the_absolute_slice() -> None:
    proj = projections()
    proj[9, 5, 3] = np.inf  # view 9, slice 5 (in the second block of 3), column 3
    volume = reconstruct_volume(da.from_array(proj, chunks=(24, 2, 24)), GEOMETRY, slice_block=3)
    with pytest.raises(InvalidInputError, match="slice 5, view 9, column 3"):
        volume.compute(scheduler="synchronous")


def test_shape_disagreeing_with_the_geometry_is_refused() -> None:
    with pytest.raises(InvalidInputError, match=r"expected \(views, rows, cols\) = \(24, 7, 24\), got \(24, 6, 24\)"):
        reconstruct_volume(da.zeros((24, 6, 24), dtype=np.float32), GEOMETRY)
    with pytest.raises(InvalidInputError, match="slice_block"):
        reconstruct_volume(da.zeros((24, ROWS, 24), dtype=np.float32), GEOMETRY, slice_block=0)
