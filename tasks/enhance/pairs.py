"""Training pairs a site builds from its own projections, with no clean image: pure numpy/torch, no I/O.

**Noise2Inverse** (Hendriksen, Pelt & Batenburg, IEEE TCI 2020). The views of a scan are split into ``K``
interleaved subsets: subset ``j`` holds views ``j, j + K, j + 2K, ...``. Each subset covers the whole angular
range at ``K`` times the view step, so it is itself a regular scan (same range, start angle shifted by ``j``
view steps) that fedscan's FBP reconstructs. Detector noise of different views is independent, so the
sub-reconstructions carry independent noise around (nearly) the same image: training a network to map the
mean of ``K - 1`` of them to the remaining one learns the clean image in expectation. fedscan uses ``K = 2``
by default: the pairs are (split 1 → split 0) and (split 0 → split 1). At inference the stage applies the network
to the full reconstruction (less noisy than a split: see the benchmark for what that costs).

**Binomial thinning** of counts. Keeping each detected photon with probability ``f`` turns Poisson(λ) counts
into Poisson(fλ) exactly, and the photons not kept are Poisson((1-f)λ), independent of the kept ones. The
supervised pair is (low dose: the kept photons → the remaining photons), never (kept → all): a thinned scan
shares its photons with its parent, and a network trained against the parent learns to keep that shared noise.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from schemas.geometry import Geometry
from tasks.errors import InvalidInputError
from tasks.reconstruct.kernels import FilterName, attenuation_to_hu, fbp

__all__ = [
    "MIN_VIEWS_PER_SPLIT",
    "counts_to_line_integrals",
    "noise2inverse_pairs",
    "reconstruct_splits",
    "split_geometry",
    "split_views",
    "thin_counts",
]

#: Fewest views a Noise2Inverse split may hold: fewer gives streaks, not noise, as the split's error.
MIN_VIEWS_PER_SPLIT = 8

FloatArray = npt.NDArray[np.float32]


def split_views(n_views: int, *, k: int = 2) -> tuple[npt.NDArray[np.intp], ...]:
    """The ``k`` interleaved view subsets of a scan of ``n_views`` views: subset ``j`` is ``j, j + k, ...``.

    Disjoint, covering ``range(n_views)``, and a function of ``(n_views, k)`` alone.

    Raises
    ------
    InvalidInputError
        ``k < 2``; ``n_views`` not a multiple of ``k`` (the subsets would not be regular scans); fewer than
        :data:`MIN_VIEWS_PER_SPLIT` views per subset. The message names the view count.

    Examples
    --------
    >>> [s.tolist() for s in split_views(16, k=2)][0][:3]
    [0, 2, 4]
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise InvalidInputError(f"a Noise2Inverse split needs k >= 2 subsets, got k={k!r}")
    if n_views % k:
        raise InvalidInputError(
            f"a scan of {n_views} views cannot be split into {k} regular subsets ({n_views} is not a multiple of {k})"
        )
    if n_views // k < MIN_VIEWS_PER_SPLIT:
        raise InvalidInputError(
            f"a scan of {n_views} views has too few views to split into {k} subsets "
            f"(at least {MIN_VIEWS_PER_SPLIT * k} needed, {MIN_VIEWS_PER_SPLIT} per subset)"
        )
    return tuple(np.arange(j, n_views, k) for j in range(k))


def split_geometry(geometry: Geometry, *, k: int, j: int) -> Geometry:
    """The geometry of subset ``j`` of :func:`split_views`: ``n_views / k`` views over the same angular range,
    starting ``j`` view steps later.

    Raises
    ------
    InvalidInputError
        ``j`` outside ``[0, k)``; a fan-beam short scan (its Parker weights assume views starting at the scan's
        start, which a shifted subset is not); and everything :func:`split_views` refuses.
    """
    split_views(geometry.n_views, k=k)
    if not 0 <= j < k:
        raise InvalidInputError(f"subset index j={j} outside [0, {k})")
    if geometry.is_fan and not geometry.is_full_circle:
        raise InvalidInputError(
            f"a fan-beam short scan ({geometry.angular_range_deg} deg) cannot be split into view subsets here"
        )
    return geometry.model_copy(
        update={
            "n_views": geometry.n_views // k,
            "start_angle_deg": geometry.start_angle_deg + j * geometry.view_step_deg,
        }
    )


def reconstruct_splits(
    projections: npt.NDArray[np.floating[Any]],
    geometry: Geometry,
    *,
    k: int = 2,
    filter_name: FilterName = "hann",
    water_attenuation_per_mm: float | None = None,
    device: torch.device,
) -> FloatArray:
    """FBP of each of the ``k`` view subsets of a block of projections.

    Parameters
    ----------
    projections : numpy.ndarray
        ``(views, rows, cols)`` line integrals (fedscan's storage layout); not modified.
    geometry : Geometry
        The whole scan's geometry (``n_views`` views, any ``n_detector_rows``).
    k : int
        Number of subsets (see :func:`split_views`).
    filter_name : str
        FBP filter (Hann: the honest baseline on noisy data).
    water_attenuation_per_mm : float, optional
        Given: the images are returned in HU; otherwise attenuation, 1/mm.
    device : torch.device

    Returns
    -------
    numpy.ndarray
        ``(k, rows, ny, nx)`` float32.

    Raises
    ------
    InvalidInputError
        A view count that cannot be split (named), projections whose shape disagrees with the geometry.
    """
    if projections.ndim != 3 or projections.shape[0] != geometry.n_views:
        raise InvalidInputError(
            f"projections must be (views={geometry.n_views}, rows, cols), got shape {projections.shape}"
        )
    subsets = split_views(geometry.n_views, k=k)
    rows = projections.shape[1]
    whole = geometry.model_copy(update={"n_detector_rows": rows})
    out = []
    for j, views in enumerate(subsets):
        sino = np.ascontiguousarray(np.asarray(projections, dtype=np.float32)[views].transpose(1, 0, 2))
        img = np.asarray(fbp(sino, split_geometry(whole, k=k, j=j), filter_name=filter_name, device=device))
        if water_attenuation_per_mm is not None:
            img = attenuation_to_hu(img, water_attenuation_per_mm=water_attenuation_per_mm)
        out.append(np.asarray(img, dtype=np.float32))
    return np.stack(out)


def noise2inverse_pairs(splits: npt.NDArray[np.floating[Any]]) -> tuple[FloatArray, FloatArray]:
    """Noise2Inverse (input, target) pairs from ``(k, n, ny, nx)`` sub-reconstructions: for each ``j`` the mean
    of the other ``k - 1`` splits → split ``j``. Returns two ``(k * n, ny, nx)`` float32 arrays, ``j``-major."""
    if splits.ndim != 4 or splits.shape[0] < 2:
        raise InvalidInputError(f"splits must be (k >= 2, n, ny, nx), got shape {splits.shape}")
    k = splits.shape[0]
    total = splits.astype(np.float64).sum(axis=0)
    inputs = np.concatenate([(total - splits[j]) / (k - 1) for j in range(k)]).astype(np.float32)
    targets = np.concatenate([splits[j] for j in range(k)]).astype(np.float32)
    return inputs, targets


def thin_counts(
    counts: npt.NDArray[np.floating[Any]] | npt.NDArray[np.integer[Any]],
    *,
    fraction: float,
    rng: np.random.Generator,
) -> tuple[FloatArray, FloatArray]:
    """Binomial thinning: each photon kept with probability ``fraction``; returns (kept, remaining) counts.

    ``kept + remaining`` is the input (rounded). For Poisson(λ) counts, ``kept`` is exactly Poisson(fλ) and
    ``remaining`` Poisson((1-f)λ), independent of each other. Counts are rounded to the nearest non-negative
    integer first: exact for photon-counting data, an approximation where electronic noise made them fractional.

    Parameters
    ----------
    counts : numpy.ndarray
        Detected photons, any shape; not modified.
    fraction : float
        In (0, 1): the kept dose fraction.
    rng : numpy.random.Generator
        The only source of randomness.

    Returns
    -------
    tuple of numpy.ndarray
        ``(kept, remaining)``, float32, the shape of ``counts``.

    Raises
    ------
    InvalidInputError
        ``fraction`` outside (0, 1); NaN/inf in ``counts``.
    """
    if not 0.0 < fraction < 1.0:
        raise InvalidInputError(f"thinning fraction must be in (0, 1), got {fraction!r}")
    if not np.isfinite(counts).all():
        raise InvalidInputError("counts hold NaN or inf; cannot thin them")
    n = np.rint(np.maximum(np.asarray(counts, dtype=np.float64), 0.0)).astype(np.int64)
    kept = rng.binomial(n, fraction)
    return kept.astype(np.float32), (n - kept).astype(np.float32)


def counts_to_line_integrals(
    counts: npt.NDArray[np.floating[Any]], *, i0_photons: float, floor: float = 0.5
) -> FloatArray:
    """``log(i0 / max(counts, floor))`` float32: line integrals of counts at ``i0_photons`` per unattenuated ray
    (a thinned scan's ``i0`` is ``fraction * i0``); ``floor`` keeps zero counts finite."""
    if not i0_photons > 0 or not floor > 0:
        raise InvalidInputError(f"i0_photons ({i0_photons}) and floor ({floor}) must be > 0")
    return np.log(i0_photons / np.maximum(np.asarray(counts, dtype=np.float64), floor)).astype(np.float32)
