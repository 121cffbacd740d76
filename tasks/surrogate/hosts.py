"""The public host pool of the surrogate stage and the policies that pick a host for each slice.

Every host ships with the code, so no site ever sees another site's data: analytic phantoms (the modified
Shepp–Logan head of :mod:`tasks.phantoms` and random-ellipse phantoms drawn from fixed, published seeds) and
grayscale scikit-image sample images (``skimage.data``, bundled with the package, no download). Hosts are scaled
to [0, 1] by their own minimum and maximum.

Size rule: phantoms are rendered directly at the requested ``(ny, nx)`` (the object fills the shorter edge);
an image is centre-cropped to the requested aspect ratio, then resampled to ``(ny, nx)`` by bilinear
interpolation with Gaussian anti-aliasing when it shrinks (``skimage.transform.resize``). The hiding kernel
itself refuses hosts of another size.

Policies (:class:`schemas.surrogate.HostPolicy`): the host index of slice ``k`` is a pure function of
``(host_seed, site_id, k, label_k)``, so any chunking of a volume picks the same hosts.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from schemas.geometry import ReconGrid
from schemas.surrogate import HostPolicy
from tasks.errors import InvalidInputError
from tasks.phantoms import Ellipse, render, shepp_logan

FloatArray = npt.NDArray[np.float32]

#: scikit-image sample images used as hosts (grayscale; colour ones through luminance).
SKIMAGE_HOSTS = (
    "camera",
    "moon",
    "coins",
    "text",
    "page",
    "brick",
    "grass",
    "gravel",
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
)
#: Random-ellipse phantoms; ``ellipses_k`` is drawn from the published seed ``(ELLIPSE_SEED, k)``.
N_ELLIPSE_HOSTS = 6
ELLIPSE_SEED = 20240325
#: Every built-in host, in the fixed order the policies index.
HOST_NAMES: tuple[str, ...] = (
    "shepp_logan",
    *(f"ellipses_{k}" for k in range(N_ELLIPSE_HOSTS)),
    *SKIMAGE_HOSTS,
)


def resolve_pool(names: Sequence[str] | None) -> tuple[str, ...]:
    """The pool's names (``None``: every built-in host); refuses an empty pool and unknown names."""
    if names is None:
        return HOST_NAMES
    pool = tuple(names)
    if not pool:
        raise InvalidInputError("the host pool is empty: give at least one host name (or None for all)")
    unknown = [n for n in pool if n not in HOST_NAMES]
    if unknown:
        raise InvalidInputError(f"unknown host names {unknown}; known: {', '.join(HOST_NAMES)}")
    return pool


def _check_shape(shape: tuple[int, int]) -> tuple[int, int]:
    if len(shape) != 2 or min(shape) < 2:
        raise InvalidInputError(f"host shape must be (ny, nx) with both >= 2, got {shape!r}")
    return int(shape[0]), int(shape[1])


def _unit(image: npt.NDArray[np.floating]) -> FloatArray:
    lo, hi = float(image.min()), float(image.max())
    if hi <= lo:
        return np.zeros(image.shape, dtype=np.float32)
    return ((image - lo) / (hi - lo)).astype(np.float32)


def _ellipse_phantom(index: int, radius: float) -> tuple[Ellipse, ...]:
    rng = np.random.default_rng(np.random.SeedSequence(ELLIPSE_SEED, spawn_key=(index,)))
    body = Ellipse(1.0, radius * rng.uniform(0.75, 0.95), radius * rng.uniform(0.6, 0.9))
    parts = [body]
    for _ in range(int(rng.integers(6, 12))):
        parts.append(
            Ellipse(
                float(rng.uniform(-0.6, 0.8)),
                radius * float(rng.uniform(0.04, 0.3)),
                radius * float(rng.uniform(0.04, 0.3)),
                radius * float(rng.uniform(-0.5, 0.5)),
                radius * float(rng.uniform(-0.45, 0.45)),
                float(rng.uniform(0.0, 180.0)),
            )
        )
    return tuple(parts)


def _skimage_image(name: str) -> npt.NDArray[np.float64]:
    import skimage.color
    import skimage.data

    image = getattr(skimage.data, name)()
    if image.ndim == 3:
        image = skimage.color.rgb2gray(image[..., :3])
    return np.asarray(image, dtype=np.float64)


def _fit(image: npt.NDArray[np.float64], shape: tuple[int, int]) -> npt.NDArray[np.float64]:
    """Centre-crop to the aspect ratio of ``shape``, then resample to ``shape``."""
    import skimage.transform

    ny, nx = shape
    h, w = image.shape
    if h * nx > w * ny:  # too tall
        ch, cw = max(1, round(w * ny / nx)), w
    else:
        ch, cw = h, max(1, round(h * nx / ny))
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = image[top : top + ch, left : left + cw]
    shrink = ch > ny or cw > nx
    return np.asarray(skimage.transform.resize(crop, shape, order=1, anti_aliasing=shrink, mode="reflect"))


@functools.lru_cache(maxsize=64)
def _load_cached(name: str, shape: tuple[int, int]) -> FloatArray:
    ny, nx = shape
    if name == "shepp_logan" or name.startswith("ellipses_"):
        grid = ReconGrid(nx_pixels=nx, ny_pixels=ny, pixel_size_mm=1.0)
        radius = 0.5 * min(ny, nx)
        phantom = shepp_logan(radius) if name == "shepp_logan" else _ellipse_phantom(int(name.split("_")[1]), radius)
        image = render(phantom, grid, supersample=2).astype(np.float64)
    else:
        image = _fit(_skimage_image(name), shape)
    out = _unit(image)
    out.flags.writeable = False
    return out


def load_host(name: str, shape: tuple[int, int]) -> FloatArray:
    """One public host at ``shape = (ny, nx)``, float32 in [0, 1] (read-only; cached).

    Raises
    ------
    InvalidInputError
        An unknown name or a shape smaller than 2 × 2.
    """
    resolve_pool((name,))
    return _load_cached(name, _check_shape(shape))


def _site_key(site_id: str) -> int:
    if not isinstance(site_id, str) or not site_id:
        raise InvalidInputError(f"site_id must be a non-empty string, got {site_id!r}")
    return int.from_bytes(hashlib.sha256(site_id.encode()).digest()[:8], "little")


_FIXED, _PER_CLASS, _RANDOM, _NOISE = 0, 1, 2, 3


def select_host_indices(
    slice_indices: npt.ArrayLike,
    *,
    policy: HostPolicy | str,
    seed: int,
    site_id: str,
    n_hosts: int,
    labels: npt.ArrayLike | None = None,
) -> npt.NDArray[np.int64]:
    """Index into the pool of each slice's host; a pure function of (seed, site, slice index, label).

    Parameters
    ----------
    slice_indices : array_like of int
        ``(n,)`` absolute indices of the slices in their volume.
    policy : HostPolicy
        ``fixed``: one host for the site; ``per_class``: one per label value (distinct hosts for the first
        ``n_hosts`` labels); ``random``: one per slice.
    seed : int
        The site's secret host seed (``>= 0``).
    site_id : str
    n_hosts : int
        Pool size (``>= 1``).
    labels : array_like of int, optional
        ``(n,)`` non-negative labels of those slices; required by ``per_class``.

    Returns
    -------
    numpy.ndarray
        ``(n,)`` int64 in ``[0, n_hosts)``.
    """
    idx = np.asarray(slice_indices)
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer) or (idx.size and idx.min() < 0):
        raise InvalidInputError(f"slice_indices must be a 1-D array of non-negative ints, got {idx!r}")
    if n_hosts < 1:
        raise InvalidInputError(f"the host pool is empty (n_hosts={n_hosts})")
    if not (isinstance(seed, int) and seed >= 0):
        raise InvalidInputError(f"host seed must be a non-negative int, got {seed!r}")
    key = _site_key(site_id)
    try:
        policy = HostPolicy(policy)
    except ValueError as exc:
        raise InvalidInputError(f"host policy must be one of {[p.value for p in HostPolicy]}, got {policy!r}") from exc
    if policy is HostPolicy.FIXED:
        host = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(key, _FIXED))).integers(n_hosts)
        return np.full(idx.shape, host, dtype=np.int64)
    if policy is HostPolicy.PER_CLASS:
        if labels is None:
            raise InvalidInputError("host_policy 'per_class' needs the slice labels; none were given")
        lab = check_labels(labels, n_slices=idx.size)
        perm = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(key, _PER_CLASS))).permutation(n_hosts)
        return perm[lab.astype(np.int64) % n_hosts].astype(np.int64)
    out = np.empty(idx.shape, dtype=np.int64)
    for j, k in enumerate(idx.tolist()):
        out[j] = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(key, _RANDOM, k))).integers(n_hosts)
    return out


def check_labels(labels: npt.ArrayLike, *, n_slices: int) -> npt.NDArray[np.int64]:
    """Per-slice labels as a ``(n_slices,)`` int64 copy; refuses a wrong length, NaN, negative or fractional values.

    Surrogate slice ``k`` keeps label ``k``: the stage never reorders slices.
    """
    lab = np.asarray(labels)
    if lab.ndim != 1 or lab.shape[0] != n_slices:
        raise InvalidInputError(
            f"labels must be one per slice: expected shape ({n_slices},), got {lab.shape} "
            "(surrogate slice k keeps label k)"
        )
    if lab.dtype == np.bool_:
        return lab.astype(np.int64)
    if not np.issubdtype(lab.dtype, np.number):
        raise InvalidInputError(f"labels must be numbers, got dtype {lab.dtype}")
    bad = ~np.isfinite(lab) | (lab < 0) | (lab != np.round(lab))
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise InvalidInputError(f"labels must be non-negative integers; label of slice {k} is {lab[k].item()!r}")
    return lab.astype(np.int64)


def hosts_for_slices(
    slice_indices: npt.ArrayLike,
    *,
    shape: tuple[int, int],
    policy: HostPolicy | str,
    seed: int,
    site_id: str,
    pool: Sequence[str] | None = None,
    labels: npt.ArrayLike | None = None,
) -> FloatArray:
    """The host image of each slice: ``(ny, nx)`` when one host serves them all, else ``(n, ny, nx)``.

    See :func:`select_host_indices` for the policy and :func:`load_host` for the size rule.
    """
    names = resolve_pool(pool)
    chosen = select_host_indices(
        slice_indices, policy=policy, seed=seed, site_id=site_id, n_hosts=len(names), labels=labels
    )
    if chosen.size and np.all(chosen == chosen[0]):
        return load_host(names[int(chosen[0])], shape)
    if chosen.size == 0:
        return np.zeros((0, *_check_shape(shape)), dtype=np.float32)
    return np.stack([load_host(names[int(i)], shape) for i in chosen])


def variant_noise(
    slice_indices: npt.ArrayLike, *, shape: tuple[int, ...], seed: int, site_id: str
) -> npt.NDArray[np.float64]:
    """``(n, ny, nx)`` standard normal draws for the ``amplitude_noise`` variant, a pure function of (seed, site,
    slice index): any chunking of a volume draws the same noise, and without the site's seed nobody can."""
    idx = np.asarray(slice_indices)
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer) or (idx.size and idx.min() < 0):
        raise InvalidInputError(f"slice_indices must be a 1-D array of non-negative ints, got {idx!r}")
    key = _site_key(site_id)
    ny, nx = shape
    out = np.empty((idx.size, ny, nx), dtype=np.float64)
    for j, k in enumerate(idx.tolist()):
        out[j] = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(key, _NOISE, k))).standard_normal(
            (ny, nx)
        )
    return out
