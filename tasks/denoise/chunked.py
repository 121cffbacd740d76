"""Chunked projection denoising: a dask array of line integrals in, a lazy dask array out (no I/O here).

``map_overlap`` hands each chunk of views to :func:`tasks.denoise.kernels.denoise_view_window` with a halo of
``config.view_halo`` views on either side — wrapped around for a full-circle scan (dask's ``periodic``
boundary), mirrored otherwise (dask's ``reflect``, which is numpy's ``symmetric``, the whole-array kernel's
padding). Groups are anchored to absolute view indices through the chunk's location, so the result equals the
whole-array kernel for any chunking, aligned with the groups or not. Rows and columns are kept whole per chunk
(the detector tiles are cut inside the kernel); chunks shorter than the halo are merged with their neighbours.

The noise σ of the automatic threshold is estimated once, from evenly spaced view triplets chosen by absolute
index (:func:`estimate_noise_sigma_dask`), so it does not depend on the chunking either; it is recorded in the
returned :class:`~schemas.denoise.DenoiseRecord`.
"""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np
import numpy.typing as npt
import torch

from schemas.denoise import DenoiseConfig, DenoiseRecord
from schemas.geometry import Geometry
from tasks.denoise.kernels import (
    check_finite,
    check_view_count,
    denoise_projections,
    denoise_view_window,
    estimate_noise_sigma,
    noise_sample_views,
    require_i0,
    resolve_group_size,
    resolve_periodic,
)
from tasks.errors import InvalidInputError


def merge_short_chunks(chunks: tuple[int, ...], *, minimum: int) -> tuple[int, ...]:
    """Merge neighbouring chunk lengths until each is at least ``minimum`` (the last merges backwards)."""
    merged: list[int] = []
    run = 0
    for c in chunks:
        run += c
        if run >= minimum:
            merged.append(run)
            run = 0
    if run:
        if merged:
            merged[-1] += run
        else:
            merged.append(run)
    return tuple(merged)


def estimate_noise_sigma_dask(
    projections: da.Array, *, config: DenoiseConfig, i0_photons: float | None = None
) -> float:
    """Noise σ (domain units) from the view triplets :func:`~tasks.denoise.kernels.noise_sample_views` picks.

    Computes only those ``3 · config.noise_sample_triplets`` views (or fewer), whatever the chunking.
    """
    _check_projections(projections, config)
    idx = noise_sample_views(projections.shape[0], n_triplets=config.noise_sample_triplets)
    sample = np.asarray(projections[idx.ravel()].compute(), dtype=np.float32)
    check_finite(sample)
    sample = sample.reshape(idx.shape[0], 3, *projections.shape[1:])
    return estimate_noise_sigma(sample, domain=config.domain, i0_photons=require_i0(config, i0_photons))


def _check_projections(projections: da.Array, config: DenoiseConfig) -> None:
    if projections.ndim != 3:
        raise InvalidInputError(f"projections must be (views, rows, cols); got shape {projections.shape}")
    if not np.issubdtype(projections.dtype, np.floating):
        raise InvalidInputError(f"projections must be floating-point line integrals; got {projections.dtype}")
    if 0 in projections.shape:
        raise InvalidInputError(f"projections are empty: shape {projections.shape} (views, rows, cols) has a zero")
    check_view_count(projections.shape[0], config)


def denoise_dask(
    projections: da.Array,
    *,
    config: DenoiseConfig,
    geometry: Geometry | None = None,
    i0_photons: float | None = None,
    noise_sigma: float | None = None,
    device: torch.device | str = "cpu",
) -> tuple[da.Array, DenoiseRecord]:
    """Lazy denoised projections, equal to the whole-array kernel for any chunking.

    Parameters
    ----------
    projections : dask.array.Array, shape (views, rows, cols)
        Line integrals (dimensionless), any chunking.
    config : DenoiseConfig
        The denoiser's parameters.
    geometry : Geometry, optional
        The scan's geometry: decides whether the view axis wraps (``Geometry.is_full_circle``) and must agree
        on the view count. Without one the views are mirrored at the ends (``view_boundary=periodic`` refused).
    i0_photons : float, optional
        Unattenuated photons per bin (``anscombe`` domain).
    noise_sigma : float, optional
        Noise σ in the domain's units; estimated from a fixed sample of views if None (this computes that
        small sample now — everything else stays lazy).
    device : torch.device or str
        Where each block is computed (a run setting, not part of the config).

    Returns
    -------
    denoised : dask.array.Array, shape (views, rows, cols), float32
        Lazy result, chunked like the input along views (short chunks merged), whole along rows and columns.
    record : DenoiseRecord
        The σ, halo and boundary used, for provenance.

    Raises
    ------
    InvalidInputError
        Wrong shape/dtype, fewer views than a group, periodic views for a scan that is not a full circle,
        ``anscombe`` without ``i0_photons``; NaN/inf or too-negative values are reported when the chunk holding
        them is computed.
    """
    given = config
    config = resolve_group_size(config, geometry)
    _check_projections(projections, config)
    n_views = projections.shape[0]
    periodic = resolve_periodic(config, geometry, n_views=n_views)
    i0 = require_i0(config, i0_photons)
    if noise_sigma is None:
        noise_sigma = estimate_noise_sigma_dask(projections, config=config, i0_photons=i0)
    record = DenoiseRecord(
        config_hash=given.config_hash(),
        noise_sigma=noise_sigma,
        views_per_group=config.group_size,
        view_stride=config.view_stride,
        periodic_views=periodic,
        view_halo=config.view_halo,
        i0_photons=i0,
    )
    halo = config.view_halo
    x = projections.astype(np.float32)
    chunks = merge_short_chunks(x.chunks[0], minimum=max(halo, 1))
    if len(chunks) == 1 or n_views < halo:  # one chunk: the whole-array kernel pads it itself
        x = x.rechunk({0: n_views, 1: -1, 2: -1})
        out = x.map_blocks(
            _whole_block,
            dtype=np.float32,
            config=config,
            periodic=periodic,
            i0_photons=i0,
            noise_sigma=noise_sigma,
            device=device,
        )
        return out, record
    x = x.rechunk({0: chunks, 1: -1, 2: -1})
    starts = np.concatenate([[0], np.cumsum(chunks)[:-1]]).astype(int)
    out = da.map_overlap(
        _window_block,
        x,
        depth={0: halo, 1: 0, 2: 0},
        boundary={0: "periodic" if periodic else "reflect", 1: "none", 2: "none"},
        trim=False,
        dtype=np.float32,
        chunks=x.chunks,
        starts=tuple(int(s) for s in starts),
        halo=halo,
        config=config,
        i0_photons=i0,
        noise_sigma=noise_sigma,
        device=device,
    )
    return out, record


def _whole_block(
    block: npt.NDArray[np.float32],
    *,
    config: DenoiseConfig,
    periodic: bool,
    i0_photons: float | None,
    noise_sigma: float,
    device: torch.device | str,
) -> npt.NDArray[np.float32]:
    return denoise_projections(
        block, config=config, periodic=periodic, i0_photons=i0_photons, noise_sigma=noise_sigma, device=device
    )


def _window_block(
    block: npt.NDArray[np.float32],
    *,
    starts: tuple[int, ...],
    halo: int,
    config: DenoiseConfig,
    i0_photons: float | None,
    noise_sigma: float,
    device: torch.device | str,
    block_info: dict[Any, Any] | None = None,
) -> npt.NDArray[np.float32]:
    assert block_info is not None
    first_view = starts[block_info[0]["chunk-location"][0]]
    return denoise_view_window(
        block,
        first_view=first_view,
        halo=halo,
        config=config,
        noise_sigma=noise_sigma,
        i0_photons=i0_photons,
        device=device,
    )
