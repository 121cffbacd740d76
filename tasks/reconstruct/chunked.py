"""Lazy slice-block reconstruction of a dask array of projections (no I/O).

Projections arrive as ``(views, rows, cols)``, chunked for denoising (a few views each). Reconstruction
needs every view of a detector row, so the array is rechunked to ``(views, slice_block, cols)`` blocks and
the kernel maps each block to ``(slice_block, ny, nx)``. One task holds about
``views * cols * slice_block * 4`` bytes of input plus ``ny * nx * slice_block * 4`` of output (and the
kernel's working memory, bounded per chunk of views), so memory is set by ``slice_block``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, get_args

import dask.array as da
import numpy as np
import torch

from schemas.geometry import Geometry
from schemas.reconstruct import ReconstructConfig, ReconstructMethod
from tasks.device import to_numpy
from tasks.errors import InvalidInputError
from tasks.reconstruct.kernels import (
    FilterName,
    attenuation_to_hu,
    check_finite_sinograms,
    fbp,
    sart,
    sirt,
)


@dataclass(frozen=True)
class Algorithm:
    """One reconstruction algorithm: its kernel and the keyword options it takes from the driver's settings."""

    kernel: Callable[..., np.ndarray | torch.Tensor]
    options: tuple[str, ...]


#: Reconstruction algorithms by the name ``ReconstructConfig.method`` takes (a test keeps the two in step).
ALGORITHMS: dict[str, Algorithm] = {
    "fbp": Algorithm(fbp, ("filter_name", "frequency_cutoff")),
    "sart": Algorithm(sart, ("iterations", "relaxation", "nonnegative")),
    "sirt": Algorithm(sirt, ("iterations", "relaxation", "nonnegative")),
}
assert set(ALGORITHMS) == set(get_args(ReconstructMethod)), "ALGORITHMS and ReconstructMethod disagree"


def _reconstruct_block(
    block: np.ndarray,
    *,
    geometry: Geometry,
    method: str,
    options: dict[str, Any],
    device: torch.device,
    output_unit: str,
    water_attenuation_per_mm: float,
    block_info: dict[Any, Any] | None = None,
) -> np.ndarray:
    first = int(block_info[0]["array-location"][0][0]) if block_info else 0
    sinograms = np.ascontiguousarray(block, dtype=np.float32)  # (slices, views, cols)
    check_finite_sinograms(sinograms, first_slice=first)
    result = ALGORITHMS[method].kernel(torch.from_numpy(sinograms), geometry, device=device, **options)
    images = result if isinstance(result, torch.Tensor) else torch.from_numpy(result)  # tensor in, tensor out
    if output_unit == "hu":
        images = attenuation_to_hu(images, water_attenuation_per_mm=water_attenuation_per_mm)
    return to_numpy(images).astype(np.float32, copy=False)


def reconstruct_volume(
    projections: da.Array,
    geometry: Geometry,
    *,
    method: ReconstructMethod = "fbp",
    filter_name: FilterName = "hann",
    frequency_cutoff: float = 1.0,
    iterations: int = 20,
    relaxation: float = 1.0,
    nonnegative: bool = True,
    slice_block: int = 16,
    output_unit: Literal["hu", "attenuation"] = "attenuation",
    water_attenuation_per_mm: float = 0.0192,
    device: torch.device | None = None,
) -> da.Array:
    """Build the lazy volume ``(slices, ny, nx)`` float32, chunked ``slice_block`` slices per task.

    Parameters
    ----------
    projections : dask.array.Array
        ``(views, rows, cols)`` line integrals; detector row ``r`` is slice ``r``. Any chunking.
    geometry : Geometry
        Must agree with the shape: ``(n_views, n_detector_rows, n_detector_cols)``.
    method, filter_name, frequency_cutoff, iterations, relaxation, nonnegative
        As for :func:`~tasks.reconstruct.kernels.fbp`, ``sart`` and ``sirt``.
    slice_block : int
        Slices per task (the last block may be smaller).
    output_unit : {"attenuation", "hu"}
        1/mm, or Hounsfield units relative to ``water_attenuation_per_mm``.
    device : torch.device, optional
        Where each block is computed (CPU when omitted).

    Returns
    -------
    dask.array.Array
        ``(rows, ny, nx)`` float32, chunks ``(slice_block, ny, nx)``. Nothing is computed here.

    Raises
    ------
    InvalidInputError
        Shape disagrees with the geometry, or a bad option. At compute time: NaN/inf in a block,
        naming the absolute slice, the view and the column.
    """
    if projections.ndim != 3:
        raise InvalidInputError(f"projections must be (views, rows, cols), got shape {projections.shape}")
    expected = (geometry.n_views, geometry.n_detector_rows, geometry.n_detector_cols)
    if tuple(projections.shape) != expected:
        raise InvalidInputError(
            f"projections shape disagrees with the geometry: expected (views, rows, cols) = {expected}, "
            f"got {tuple(projections.shape)}"
        )
    if isinstance(slice_block, bool) or not isinstance(slice_block, int) or slice_block < 1:
        raise InvalidInputError(f"slice_block must be a positive integer, got {slice_block!r}")
    if method not in ALGORITHMS:
        raise InvalidInputError(f"method must be one of {sorted(ALGORITHMS)}, got {method!r}")
    if output_unit not in ("hu", "attenuation"):
        raise InvalidInputError(f"output_unit must be 'hu' or 'attenuation', got {output_unit!r}")
    given = {
        "filter_name": filter_name,
        "frequency_cutoff": frequency_cutoff,
        "iterations": iterations,
        "relaxation": relaxation,
        "nonnegative": nonnegative,
    }
    options = {name: given[name] for name in ALGORITHMS[method].options}
    grid = geometry.grid
    # All views of a block of rows per task; the transpose is lazy (done per block, in memory).
    blocks = projections.astype(np.float32).rechunk({0: -1, 1: slice_block, 2: -1}).transpose(1, 0, 2)
    return da.map_blocks(
        _reconstruct_block,
        blocks,
        geometry=geometry,
        method=method,
        options=options,
        device=device if device is not None else torch.device("cpu"),
        output_unit=output_unit,
        water_attenuation_per_mm=water_attenuation_per_mm,
        chunks=(blocks.chunks[0], (grid.ny_pixels,), (grid.nx_pixels,)),
        dtype=np.float32,
        meta=np.empty((0, 0, 0), dtype=np.float32),
    )


def reconstruct_with_config(
    projections: da.Array,
    geometry: Geometry,
    config: ReconstructConfig,
    *,
    water_attenuation_per_mm: float | None = None,
    device: torch.device | None = None,
) -> da.Array:
    """:func:`reconstruct_volume` with every option taken from ``config``; ``device`` is a run setting.

    ``water_attenuation_per_mm`` overrides the config's value (the stage driver passes the scan manifest's).
    """
    return reconstruct_volume(
        projections,
        geometry,
        method=config.method,
        filter_name=config.filter_name,
        frequency_cutoff=config.frequency_cutoff,
        iterations=config.iterations,
        relaxation=config.relaxation,
        nonnegative=config.nonnegative,
        slice_block=config.slice_block,
        output_unit=config.output_unit,
        water_attenuation_per_mm=(
            config.water_attenuation_per_mm if water_attenuation_per_mm is None else water_attenuation_per_mm
        ),
        device=device,
    )
