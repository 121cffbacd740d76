"""Chunked FESF surrogates: a dask volume in, a lazy dask surrogate volume out (no I/O here).

Each block of whole slices goes through :func:`surrogate_slices`: map to the common intensity range
(:func:`tasks.surrogate.kernels.to_unit_range`), pick each slice's public host from its absolute slice index
(:func:`tasks.surrogate.hosts.hosts_for_slices`), hide (:func:`tasks.surrogate.kernels.hide`) and, with IQEM,
enhance and hide again (:func:`tasks.surrogate.iqem.enhance_and_rehide`). Slices are independent, so the result
does not depend on the chunking along slices; rows and columns are kept whole (the FFT needs them).

Labels stay aligned by construction: the stage never reorders or drops slices, so surrogate slice ``k`` has
label ``k``; :func:`surrogate_labels` checks a label array against the volume and returns the copy to store
beside the surrogates.
"""

from __future__ import annotations

from typing import Any, cast

import dask.array as da
import numpy as np
import numpy.typing as npt
import torch

from schemas.surrogate import HostPolicy, SurrogateConfig, SurrogateVariant
from tasks.device import to_numpy
from tasks.errors import InvalidInputError
from tasks.surrogate.hosts import check_labels, hosts_for_slices, variant_noise
from tasks.surrogate.iqem import Generator, enhance_and_rehide
from tasks.surrogate.kernels import Variant, hide, hide_variant, to_unit_range

FloatArray = npt.NDArray[np.float32]


def surrogate_labels(labels: npt.ArrayLike | None, *, n_slices: int) -> npt.NDArray[np.int64]:
    """The labels of the surrogate volume (``(n_slices,)`` int64, label ``k`` ↔ surrogate slice ``k``).

    Raises
    ------
    InvalidInputError
        Labels missing, of another length than the volume's slices, or not non-negative integers.
    """
    if labels is None:
        raise InvalidInputError(f"labels are missing: the surrogate volume has {n_slices} slices, one label each")
    return check_labels(labels, n_slices=n_slices)


def surrogate_slices(
    images: npt.ArrayLike,
    *,
    config: SurrogateConfig,
    site_id: str,
    first_slice: int = 0,
    labels: npt.ArrayLike | None = None,
    generator: Generator | None = None,
    device: torch.device | str = "cpu",
) -> FloatArray:
    """Surrogates of consecutive slices ``first_slice, first_slice + 1, …`` of one site's volume (in memory).

    Parameters
    ----------
    images : array_like
        ``(slices, ny, nx)`` private slices in ``config.input_unit`` (HU or 1/mm).
    config : SurrogateConfig
    site_id : str
        Part of the host draw (with ``config.host_seed``).
    first_slice : int
        Absolute index of ``images[0]`` in its volume (hosts are drawn per absolute index).
    labels : array_like, optional
        ``(slices,)`` labels of these slices; needed by the ``per_class`` policy.
    generator : Generator, optional
        The site's trained IQEM generator; required when ``config.iqem.enabled``.
    device : torch.device or str
        Where hiding runs, already resolved ("cpu" or "cuda").

    Returns
    -------
    numpy.ndarray
        ``(slices, ny, nx)`` float32 surrogates in the common dimensionless range.
    """
    x = np.asarray(images)
    if x.ndim != 3:
        raise InvalidInputError(f"images must be (slices, ny, nx), got shape {x.shape}")
    if config.iqem.enabled and generator is None:
        raise InvalidInputError(
            "config.iqem.enabled needs the site's trained generator (tasks.surrogate.iqem.train_iqem)"
        )
    if config.host_policy is HostPolicy.PER_CLASS:
        labels = surrogate_labels(labels, n_slices=x.shape[0])
    private = to_unit_range(
        x.astype(np.float32, copy=False),
        unit=config.input_unit.value,
        window_hu=config.window_hu,
        water_attenuation_per_mm=config.water_attenuation_per_mm,
    )
    hosts = hosts_for_slices(
        np.arange(first_slice, first_slice + x.shape[0]),
        shape=(x.shape[1], x.shape[2]),
        policy=config.host_policy,
        seed=config.host_seed,
        site_id=site_id,
        pool=config.host_pool,
        labels=labels,
    )
    if config.variant is not SurrogateVariant.PAPER:  # numpy on the full spectrum (SurrogateConfig.variant)
        noise = (
            variant_noise(
                np.arange(first_slice, first_slice + x.shape[0]),
                shape=x.shape[1:],
                seed=config.host_seed,
                site_id=site_id,
            )
            if config.variant is SurrogateVariant.AMPLITUDE_NOISE
            else None
        )
        return hide_variant(
            private,
            hosts,
            alpha=config.alpha,
            beta=config.beta,
            variant=cast(Variant, config.variant.value),
            noise=noise,
            noise_sigma=config.amplitude_noise_sigma,
            phase_half_width=config.private_phase_half_width,
        )
    p = torch.from_numpy(private).to(torch.device(device))
    if config.iqem.enabled and generator is not None:
        s = hide(p, hosts, alpha=config.alpha, beta=config.beta)
        s = enhance_and_rehide(p, s, generator, alpha=config.alpha, beta=config.beta)
    else:  # the private slices are not needed afterwards: hide in place, no new output to allocate and fault in
        s = hide(p, hosts, alpha=config.alpha, beta=config.beta, out=p)
    return to_numpy(s)


def surrogate_volume(
    volume: da.Array,
    config: SurrogateConfig,
    *,
    site_id: str,
    labels: npt.ArrayLike | None = None,
    generator: Generator | None = None,
    device: torch.device | str = "cpu",
) -> da.Array:
    """Lazy surrogates of a site's volume: ``map_blocks`` of :func:`surrogate_slices` over blocks of slices.

    Parameters
    ----------
    volume : dask.array.Array
        ``(slices, ny, nx)`` in ``config.input_unit``; any chunking (rows and columns are merged per block).
    config : SurrogateConfig
    site_id : str
    labels : array_like, optional
        ``(slices,)``; required by ``host_policy="per_class"`` (checked here, sliced per block).
    generator : Generator, optional
        Trained IQEM generator; required when ``config.iqem.enabled``.
    device : torch.device or str
        Where hiding runs (a run setting, not part of the config).

    Returns
    -------
    dask.array.Array
        ``(slices, ny, nx)`` float32, chunked like ``volume`` along slices with whole slices per chunk; the
        same values for every chunking.
    """
    if volume.ndim != 3:
        raise InvalidInputError(f"volume must be (slices, ny, nx), got shape {volume.shape}")
    if not np.issubdtype(volume.dtype, np.number) or np.issubdtype(volume.dtype, np.complexfloating):
        raise InvalidInputError(f"volume must be real numbers, got dtype {volume.dtype}")
    if config.iqem.enabled and generator is None:
        raise InvalidInputError(
            "config.iqem.enabled needs the site's trained generator (tasks.surrogate.iqem.train_iqem)"
        )
    lab = None
    if labels is not None or config.host_policy is HostPolicy.PER_CLASS:
        lab = surrogate_labels(labels, n_slices=volume.shape[0])
    whole = volume.rechunk({1: -1, 2: -1})

    def block(x: np.ndarray, block_info: dict[Any, Any] | None = None) -> FloatArray:
        start, stop = block_info[0]["array-location"][0] if block_info else (0, x.shape[0])
        return surrogate_slices(
            x,
            config=config,
            site_id=site_id,
            first_slice=start,
            labels=None if lab is None else lab[start:stop],
            generator=generator,
            device=device,
        )

    return whole.map_blocks(block, dtype=np.float32, meta=np.empty((0, 0, 0), dtype=np.float32))
