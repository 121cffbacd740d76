"""Projection-domain denoising by low rank of neighbouring-view groups: numpy in, numpy out, pure torch.

Neighbouring views of a scan are nearly alike, so a block of ``t`` consecutive views of a detector tile (a
``t × M`` matrix, one row per view) is nearly low rank: each block is rebuilt from its leading singular
components and overlapping blocks are averaged. ``docs/methods.md`` §1 sets the method as published beside the
choices made here.

Entry points: :func:`denoise_projections` denoises a whole scan in memory; :func:`denoise_view_window` one chunk
of views carrying a halo of ``config.view_halo`` views on each side (the kernel ``tasks.denoise.chunked`` maps
over chunks). Blocks are anchored to absolute view indices, so the chunk kernel gives exactly the rows of the
whole-scan result. :func:`estimate_noise_sigma` and :func:`noise_sample_views` give the noise level the automatic
thresholds use; :func:`resolve_periodic` and :func:`resolve_group_size` adapt a config to a scan's geometry.

One estimate, three implementations, each the fastest for its modes and all equal to rebuilding every block on
its own: the automatic thresholds (the default) run as one banded filter along views per detector cell
(:mod:`._banded`); the paper's thresholds run block by block (:mod:`._blocks`), rebuilding non-overlapping
blocks (:meth:`DenoiseConfig.paper`) straight into the result and adding overlapping ones back phase by phase.
The block-by-block path accepts every mode and is the reference the banded filter is tested against.

Noise model: counts ~ Poisson(I0·exp(-p)), clamped to a small positive floor before the log. In the
``anscombe`` domain the block values are ``2·sqrt(I0·exp(-p) + 3/8)`` (unit noise variance), inverted with the
closed-form exact unbiased inverse of Mäkitalo & Foi [4]_.

References
----------
.. [1] arXiv:2412.06135, projection denoising by similarity of neighbouring views (rank-1 SVD of view groups).
.. [2] M. Gavish, D. L. Donoho, "The optimal hard threshold for singular values is 4/√3", IEEE TIT 60 (2014).
.. [3] M. Gavish, D. L. Donoho, "Optimal shrinkage of singular values", IEEE TIT 63 (2017).
.. [4] M. Mäkitalo, A. Foi, "A closed-form approximation of the exact unbiased inverse of the Anscombe
   variance-stabilizing transformation", IEEE TIP 20 (2011).
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import torch

from schemas.denoise import DenoiseConfig, DenoiseDomain, ViewBoundary
from schemas.geometry import Geometry
from tasks.denoise.kernels._banded import banded_denoise
from tasks.denoise.kernels._blocks import block_axes, centred, disjoint, per_block_denoise, symmetric_index, to_domain
from tasks.device import to_numpy
from tasks.errors import DeviceUnavailableError, InvalidInputError

__all__ = [
    "check_finite",
    "check_view_count",
    "denoise_projections",
    "denoise_view_window",
    "estimate_noise_sigma",
    "estimate_noise_sigma_of",
    "noise_sample_views",
    "pad_views",
    "require_i0",
    "resolve_group_size",
    "resolve_periodic",
]

#: Line integrals below ``-_NEGATIVE_TOLERANCE_SIGMA · σ`` cannot come from noise around an air reading.
_NEGATIVE_TOLERANCE_SIGMA = 8.0
#: 1.4826 · MAD estimates a Gaussian σ.
_MAD_TO_SIGMA = 1.482602218505602
#: Smallest and largest group size the angular span may choose, views.
_GROUP_SIZE_RANGE = (4, 32)

FloatArray = npt.NDArray[np.float32]


def _as_projections(projections: npt.ArrayLike) -> FloatArray:
    arr = np.asarray(projections)
    if arr.ndim != 3:
        raise InvalidInputError(f"projections must be (views, rows, cols); got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise InvalidInputError(f"projections must be floating-point line integrals; got dtype {arr.dtype}")
    if arr.size == 0:
        raise InvalidInputError(f"projections are empty: shape {arr.shape} (views, rows, cols) has a zero")
    return arr.astype(np.float32, copy=False)


def check_finite(projections: FloatArray, *, view_offset: int = 0) -> None:
    """Raise :class:`InvalidInputError` naming the first view and row that hold a NaN or infinity.

    Parameters
    ----------
    projections : ndarray, shape (views, rows, cols)
        Line integrals.
    view_offset : int
        Absolute index of ``projections[0]`` in the scan (for the message).
    """
    bad = ~np.isfinite(projections)
    if bad.any():
        v, r, c = (int(i) for i in np.argwhere(bad)[0])
        raise InvalidInputError(
            f"projections hold {int(bad.sum())} non-finite value(s); the first is {projections[v, r, c]} "
            f"at view {v + view_offset}, row {r}, col {c}"
        )


def _finite_minimum(values: torch.Tensor, projections: FloatArray, *, view_offset: int = 0) -> float:
    """The smallest of ``values`` (``projections`` as a CPU tensor), refusing NaN/inf: one ``aminmax`` pass (a NaN
    makes both ends NaN), then :func:`check_finite` only to name the first bad value."""
    low, high = (float(v) for v in torch.aminmax(values))
    if not (math.isfinite(low) and math.isfinite(high)):
        check_finite(projections, view_offset=view_offset)
    return low


def _check_not_negative(projections: FloatArray, *, tolerance: float, view_offset: int = 0) -> None:
    """Refuse line integrals below ``-tolerance`` (more negative than noise around an air reading can make).

    Parameters
    ----------
    projections : ndarray, shape (views, rows, cols)
        Line integrals (dimensionless).
    tolerance : float
        Largest negative excursion noise can explain, dimensionless (≥ 0).
    view_offset : int
        Absolute index of ``projections[0]`` in the scan (for the message).
    """
    low = projections < -tolerance
    if low.any():
        flat = int(np.argmin(projections))
        v, r, c = np.unravel_index(flat, projections.shape)
        raise InvalidInputError(
            f"{int(low.sum())} line integral(s) lie below -{tolerance:.4g} (the noise tolerance); the most "
            f"negative is {float(projections[v, r, c]):.4g} at view {int(v) + view_offset}, row {int(r)}, "
            f"col {int(c)}: the data are not -log(I/I0) with the right I0 (air calibration?)"
        )


def resolve_periodic(config: DenoiseConfig, geometry: Geometry | None, *, n_views: int) -> bool:
    """Whether the view axis wraps around, from ``config.view_boundary`` and the scan's geometry.

    Raises
    ------
    InvalidInputError
        Periodic views asked for where the geometry does not cover a full circle (or is unknown), or the
        geometry's view count differs from the array's.
    """
    if geometry is not None and geometry.n_views != n_views:
        raise InvalidInputError(f"the geometry has {geometry.n_views} views but the projections have {n_views}")
    full = geometry is not None and geometry.is_full_circle
    if config.view_boundary is ViewBoundary.PERIODIC:
        if not full:
            span = "unknown" if geometry is None else f"{geometry.angular_range_deg} deg"
            raise InvalidInputError(
                f"view_boundary=periodic needs a full-circle scan (360 deg); the angular range is {span}: "
                "use view_boundary=mirror or auto"
            )
        return True
    if config.view_boundary is ViewBoundary.MIRROR:
        return False
    return full


def resolve_group_size(config: DenoiseConfig, geometry: Geometry | None) -> DenoiseConfig:
    """The config with a number for ``views_per_group``: as given, or for 'auto' chosen from the scan's angular
    step and ``config.group_span_deg``.

    For 'auto', ``t`` is the power of two nearest ``group_span_deg / step`` (step = angular range / views),
    within 4..32 views, or NOMINAL_VIEWS_PER_GROUP when the geometry is unknown; ``view_stride`` (and
    ``first_pass_view_stride``) keep their ratio to it. Neighbouring views must look alike for the low-rank model:
    a fixed ``t`` spans 16 degrees at 1 degree per view and blurs, while 4 views at 0.25 degrees leave most of the
    noise.
    """
    if config.views_per_group != "auto":
        return config
    t_old = config.group_size
    if geometry is None:
        t = t_old
    else:
        step = geometry.angular_range_deg / geometry.n_views
        lo, hi = _GROUP_SIZE_RANGE
        t = int(min(hi, max(lo, 2 ** round(math.log2(max(config.group_span_deg / step, 1.0))))))
    fields = config.model_dump()
    fields["views_per_group"] = t
    fields["view_stride"] = max(1, t * config.view_stride // t_old)
    if config.first_pass_view_stride is not None:
        fields["first_pass_view_stride"] = max(1, t * config.first_pass_view_stride // t_old)
    while t % fields["view_stride"]:
        fields["view_stride"] -= 1
    while fields["first_pass_view_stride"] is not None and t % fields["first_pass_view_stride"]:
        fields["first_pass_view_stride"] -= 1
    return DenoiseConfig.model_validate(fields)


def _check_device(device: str | torch.device) -> torch.device:
    """Turn ``device`` into a :class:`torch.device`, refusing CUDA where there is none."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError(f"device {dev} asked for but torch sees no CUDA device here")
    return dev


def check_view_count(n_views: int, config: DenoiseConfig) -> None:
    """Refuse a scan with fewer views than one group (``config.group_size``)."""
    if n_views < config.group_size:
        raise InvalidInputError(
            f"{n_views} view(s) are fewer than views_per_group={config.group_size}: a group needs "
            "that many consecutive views"
        )


def noise_sample_views(n_views: int, *, n_triplets: int) -> npt.NDArray[np.int64]:
    """Indices of the evenly spaced triplets of consecutive views the noise σ is estimated from.

    Depends only on ``n_views`` and ``n_triplets`` (never on chunking). Shape ``(k, 3)``, ``k ≤ n_triplets``.
    """
    if n_views < 3:
        raise InvalidInputError(f"estimating the noise needs at least 3 views; got {n_views}")
    k = min(n_triplets, n_views // 3)
    starts = (np.arange(k, dtype=np.int64) * (n_views - 2)) // k
    return starts[:, None] + np.arange(3, dtype=np.int64)[None, :]


def require_i0(config: DenoiseConfig, i0_photons: float | None) -> float | None:
    if config.domain is DenoiseDomain.ANSCOMBE:
        if i0_photons is None or not math.isfinite(i0_photons) or i0_photons <= 0:
            raise InvalidInputError(
                f"domain=anscombe needs the unattenuated photons per bin i0_photons > 0; got {i0_photons}"
            )
        return float(i0_photons)
    return None


# ---- noise level --------------------------------------------------------------------------------------------
def estimate_noise_sigma(
    samples: npt.ArrayLike, *, domain: DenoiseDomain = DenoiseDomain.LOG, i0_photons: float | None = None
) -> float:
    """Noise σ per element, from triplets of consecutive views (robust: MAD of second differences).

    The second difference ``x[v-1] - 2x[v] + x[v+1]`` along views cancels the slowly varying signal and keeps
    white noise with variance ``6σ²``; the median absolute deviation ignores the few edges where the signal
    moves fast.

    Parameters
    ----------
    samples : array_like, shape (k, 3, rows, cols)
        ``k`` triplets of consecutive views of line integrals (see :func:`noise_sample_views`).
    domain, i0_photons
        The domain σ is wanted in (``anscombe`` needs ``i0_photons``).

    Returns
    -------
    float
        σ in the domain's units (≈ 1 in the Anscombe domain when ``i0_photons`` is right).
    """
    arr = np.asarray(samples, dtype=np.float32)
    if arr.ndim != 4 or arr.shape[1] != 3 or arr.size == 0:
        raise InvalidInputError(f"noise samples must be (k, 3, rows, cols), none of them zero; got {arr.shape}")
    values = to_domain(torch.from_numpy(arr), domain=domain, i0_photons=i0_photons).double()
    d2 = (values[:, 0] - 2.0 * values[:, 1] + values[:, 2]).reshape(-1).numpy()
    mad = _lower_median(np.abs(d2 - _lower_median(d2)))
    return float(_MAD_TO_SIGMA * mad / math.sqrt(6.0))


def _lower_median(values: npt.NDArray[np.float64]) -> float:
    """The lower of the two middle values for an even count, as ``torch.median`` (by selection, not a sort)."""
    k = (values.size - 1) // 2
    return float(np.partition(values, k)[k])


def estimate_noise_sigma_of(projections: npt.ArrayLike, *, config: DenoiseConfig, i0_photons: float | None) -> float:
    """σ of a whole in-memory scan, from the same view triplets the chunked driver uses."""
    arr = _as_projections(projections)
    idx = noise_sample_views(arr.shape[0], n_triplets=config.noise_sample_triplets)
    return estimate_noise_sigma(arr[idx], domain=config.domain, i0_photons=require_i0(config, i0_photons))


def denoise_view_window(
    window: npt.ArrayLike,
    *,
    first_view: int,
    halo: int,
    config: DenoiseConfig,
    noise_sigma: float,
    i0_photons: float | None = None,
    device: str | torch.device = "cpu",
) -> FloatArray:
    """Denoise the core views of a window that carries ``halo`` extra views on each side (the chunk kernel).

    Parameters
    ----------
    window : array_like, shape (halo + n + halo, rows, cols)
        Line integrals (dimensionless, float32); views beyond the scan's ends already padded (wrapped for a
        full circle, mirrored otherwise).
    first_view : int
        Absolute view index of ``window[halo]`` (groups are anchored to absolute indices).
    halo : int
        Extra views on each side, ``≥ config.view_halo``.
    config : DenoiseConfig
        The denoiser's parameters.
    noise_sigma : float
        Noise σ in the domain's units, estimated once for the whole scan (:func:`estimate_noise_sigma`).
    i0_photons : float, optional
        Unattenuated photons per bin; needed by the ``anscombe`` domain.
    device : str or torch.device
        Where the blocks are computed.

    Returns
    -------
    ndarray, shape (n, rows, cols), float32
        Denoised line integrals of the core views.

    Raises
    ------
    InvalidInputError
        Non-finite values, line integrals more negative than noise allows, a halo too small.
    DeviceUnavailableError
        CUDA asked for where there is none.
    """
    arr = _as_projections(window)
    if halo < config.view_halo:
        raise InvalidInputError(f"halo={halo} views is less than the config needs ({config.view_halo})")
    n_core = arr.shape[0] - 2 * halo
    if n_core <= 0:
        raise InvalidInputError(f"a window of {arr.shape[0]} views has no core views inside a halo of {halo}")
    _check_noise_sigma(noise_sigma)
    i0 = require_i0(config, i0_photons)
    tol = _negative_tolerance(config=config, noise_sigma=noise_sigma, i0_photons=i0)
    host = torch.from_numpy(np.ascontiguousarray(arr))
    low = _finite_minimum(host, arr, view_offset=first_view - halo)
    if low < -tol:  # the halo may hold it (then the core passes)
        _check_not_negative(arr[halo : halo + n_core], tolerance=tol, view_offset=first_view)
    dev = _check_device(device)
    return _denoise_window(
        host.to(dev), first_view=first_view, halo=halo, config=config, noise_sigma=noise_sigma, i0_photons=i0
    )


def _denoise_window(
    data: torch.Tensor,
    *,
    first_view: int,
    halo: int,
    config: DenoiseConfig,
    noise_sigma: float,
    i0_photons: float | None,
) -> FloatArray:
    """:func:`denoise_view_window` on a checked window already on its device (not modified).

    The automatic (centred) modes run as the banded filter (:func:`banded_denoise`), the paper's thresholds
    block by block (:func:`per_block_denoise`).
    """
    n_core = data.shape[0] - 2 * halo
    if centred(config):
        est = banded_denoise(
            data,
            first_view=first_view - halo,
            out_lo=first_view,
            out_hi=first_view + n_core,
            config=config,
            sigma=noise_sigma,
            i0_photons=i0_photons,
        )
    else:
        est = per_block_denoise(
            data, first_view=first_view, halo=halo, config=config, noise_sigma=noise_sigma, i0_photons=i0_photons
        )
    return to_numpy(est.to(torch.float32))


def _pad_index(n: int, *, halo: int, periodic: bool) -> torch.Tensor:
    """The views ``-halo … n + halo - 1`` of an ``n``-view scan: wrapped for a full circle, else mirrored."""
    return torch.arange(-halo, n + halo) % n if periodic else symmetric_index(-halo, n + halo, n)


def _check_noise_sigma(noise_sigma: float) -> None:
    if not math.isfinite(noise_sigma) or noise_sigma < 0:
        raise InvalidInputError(f"noise_sigma must be finite and >= 0; got {noise_sigma}")


def pad_views(projections: FloatArray, *, halo: int, periodic: bool) -> FloatArray:
    """Pad ``halo`` views on both ends: wrapped for a full circle, else mirrored (numpy ``symmetric``)."""
    return projections[_pad_index(projections.shape[0], halo=halo, periodic=periodic).numpy()]


def denoise_projections(
    projections: npt.ArrayLike,
    *,
    config: DenoiseConfig,
    periodic: bool,
    i0_photons: float | None = None,
    noise_sigma: float | None = None,
    device: str | torch.device = "cpu",
) -> FloatArray:
    """Denoise a whole in-memory scan of line integrals by low rank of neighbouring-view groups.

    Parameters
    ----------
    projections : array_like, shape (views, rows, cols)
        Line integrals ``p = -log(I/I0)`` (dimensionless), float32. Never modified.
    config : DenoiseConfig
        The denoiser's parameters (:meth:`DenoiseConfig.paper` for the paper's mode).
    periodic : bool
        True for a full-circle scan (the view axis wraps around); see :func:`resolve_periodic`.
    i0_photons : float, optional
        Unattenuated photons per bin (needed by the ``anscombe`` domain).
    noise_sigma : float, optional
        Noise σ in the domain's units; estimated from the data (:func:`estimate_noise_sigma_of`) if None.
    device : str or torch.device
        Torch device for the blocks.

    Returns
    -------
    ndarray, shape (views, rows, cols), float32
        Denoised line integrals.

    Raises
    ------
    InvalidInputError
        Not 3-D, NaN/inf (names view and row), line integrals more negative than noise allows (says how many
        and how negative), fewer views than ``views_per_group``, ``anscombe`` without ``i0_photons``.
    DeviceUnavailableError
        CUDA asked for where there is none.

    Notes
    -----
    On pure white noise the paper's mode (rank 1, non-overlapping groups of ``t`` views, blocks of ``M``
    elements) keeps about ``(1 + sqrt(t/M))² / t`` of the noise variance; the automatic modes remove nearly all
    of it.

    Examples
    --------
    >>> from schemas.denoise import DenoiseConfig, DenoiseDomain
    >>> rng = np.random.default_rng(0)
    >>> clean = np.tile(np.linspace(0.5, 1.5, 40, dtype=np.float32), (64, 2, 1))
    >>> noisy = clean + rng.normal(0.0, 0.05, clean.shape).astype(np.float32)
    >>> out = denoise_projections(noisy, config=DenoiseConfig(domain=DenoiseDomain.LOG), periodic=True)
    >>> out.shape, bool(np.abs(out - clean).mean() < 0.5 * np.abs(noisy - clean).mean())
    ((64, 2, 40), True)
    """
    arr = _as_projections(projections)
    check_view_count(arr.shape[0], config)
    host = torch.from_numpy(np.ascontiguousarray(arr))
    low = _finite_minimum(host, arr)
    i0 = require_i0(config, i0_photons)
    if noise_sigma is None:
        noise_sigma = estimate_noise_sigma_of(arr, config=config, i0_photons=i0)
    halo = config.view_halo
    dev = _check_device(device)
    _check_noise_sigma(noise_sigma)
    tol = _negative_tolerance(config=config, noise_sigma=noise_sigma, i0_photons=i0)
    if low < -tol:
        _check_not_negative(arr, tolerance=tol)
    if _groups_tile_the_views(config, arr.shape):  # no block reaches past the scan's ends: nothing to pad
        halo, data = 0, host.to(dev)
    elif dev.type == "cuda":  # pad on the device: a padded host copy costs more than the whole denoising there
        data = host.to(dev).index_select(0, _pad_index(arr.shape[0], halo=halo, periodic=periodic).to(dev))
    else:
        data = torch.from_numpy(pad_views(arr, halo=halo, periodic=periodic))
    return _denoise_window(data, first_view=0, halo=halo, config=config, noise_sigma=noise_sigma, i0_photons=i0)


def _groups_tile_the_views(config: DenoiseConfig, shape: tuple[int, ...]) -> bool:
    """Whether a whole scan of ``shape`` needs no views beyond its ends: one pass of uncentred, non-overlapping
    blocks (the paper's mode) whose groups tile the views exactly, so no block reaches past either end."""
    if config.second_pass or centred(config):
        return False
    views, rows, cols = shape
    return views % config.group_size == 0 and disjoint(block_axes(config, rows, cols, pilot=False))


def _negative_tolerance(*, config: DenoiseConfig, noise_sigma: float, i0_photons: float | None) -> float:
    """Most negative line integral that noise around an air reading can explain (dimensionless).

    Log domain: ``8σ`` with σ the data's own (median) noise level. Anscombe domain: an air reading has
    σ_p ≈ 1/sqrt(I0), scaled by the measured σ when that exceeds its nominal 1.
    """
    if config.domain is DenoiseDomain.ANSCOMBE and i0_photons is not None:
        sigma_p = max(1.0, noise_sigma) / math.sqrt(i0_photons)
    else:
        sigma_p = noise_sigma
    return _NEGATIVE_TOLERANCE_SIGMA * sigma_p + 1e-6
