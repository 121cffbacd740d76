"""Tomography kernels: projector, matched back-projector, FBP, SART and SIRT (torch, CPU or CUDA).

Every function works on a block of slices at once: images are ``(slices, ny, nx)`` attenuation in 1/mm,
sinograms ``(slices, views, cols)`` line integrals (dimensionless). A 2-D array is one slice. Inputs may
be numpy arrays or torch tensors; the result is of the same kind (numpy in, numpy out), float32. The
geometry conventions are those of :mod:`schemas.geometry`; in addition this module fixes where the
source and the rays sit at view angle θ:

* detector axis ``e(θ) = (cos θ, sin θ)``, ray direction ``d(θ) = (-sin θ, cos θ)`` in (x, y), mm;
* parallel beam: the ray of detector coordinate ``u`` is ``{u e + t d}``, i.e. ``u = x cos θ + y sin θ``;
* fan beam: the source is at ``-SID d(θ)``; the detector centre at ``(SDD - SID) d(θ)``; a flat
  detector extends along ``e``, a curved one is the arc of radius SDD around the source, ``u`` its arc
  length, positive towards ``e``.

Model. :func:`forward_project` is Joseph's method: each ray is sampled once per pixel row (or column,
whichever axis it crosses more steeply) with linear interpolation between the two nearest pixels, the
sample weighted by the path length per step. :func:`back_project` applies the exact transpose of that
matrix (built row-wise for the rays and column-wise for the pixels from the same per-ray numbers), so
``<A x, y> = <x, A^T y>`` to float32 rounding. :func:`fbp` uses its own pixel-driven back-projection with
linear interpolation on the detector (the standard discretisation of the FBP integral; the Joseph
adjoint would leave ray-spacing artefacts). The sparse matrices are built per chunk of views, on the
device, and small ones are cached per geometry.

One module, though over 600 lines: the Joseph operator (behind the projector, its adjoint, SIRT and SART) and the
FBP back-projection map pixels to the detector with the same per-view frames and pixel-column function
(``_view_frames``, ``_pixel_columns_of``); the conventions above are stated once, here, for all of them.

References
----------
Kak, A. C. & Slaney, M., *Principles of Computerized Tomographic Imaging*, IEEE Press (1988), ch. 3 (FBP
for parallel, equi-angular and equispaced fan beams) and ch. 7 (SART).
Joseph, P. M., "An improved algorithm for reprojecting rays through pixel images", IEEE TMI 1 (1982).
Parker, D. L., "Optimal short scan convolution reconstruction for fan beam CT", Med. Phys. 9 (1982);
Wesarg, S. et al., "Parker weights revisited", Med. Phys. 29 (2002) (over-scan generalisation).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TypeVar, get_args

import numpy as np
import torch

from schemas.geometry import DetectorShape, Geometry
from schemas.reconstruct import FilterName
from tasks.device import to_numpy
from tasks.errors import InvalidInputError

# torch warns once per process (TORCH_WARN_ONCE) that sparse CSR is "beta"; the operations used here are
# stable, so spend that one warning here, silenced, instead of in the caller's code.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.sparse_csr_tensor(
        torch.zeros(2, dtype=torch.int32),
        torch.zeros(0, dtype=torch.int32),
        torch.zeros(0),
        (1, 1),
        check_invariants=False,
    )

__all__ = [
    "FilterName",
    "attenuation_to_hu",
    "back_project",
    "check_finite_sinograms",
    "fbp",
    "forward_project",
    "hu_to_attenuation",
    "sart",
    "sirt",
]

_FILTER_NAMES: tuple[str, ...] = get_args(FilterName)
ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)

#: Entries per sparse chunk; bounds the working memory of one chunk (~12 bytes per entry while built).
_CHUNK_NNZ = 6_000_000
#: Total entries cached per geometry (values + int32 indices: 8 bytes each), ~200 MB.
_CACHE_NNZ = 25_000_000


# ---- conversions ---------------------------------------------------------------------------------
def _check_water(water_attenuation_per_mm: float) -> None:
    if not (math.isfinite(water_attenuation_per_mm) and water_attenuation_per_mm > 0):
        raise InvalidInputError(
            f"water_attenuation_per_mm must be a positive finite number, got {water_attenuation_per_mm!r}"
        )


def hu_to_attenuation(hu: ArrayT, *, water_attenuation_per_mm: float) -> ArrayT:
    """Convert Hounsfield units to linear attenuation, ``mu = mu_w (1 + HU / 1000)``.

    Parameters
    ----------
    hu : numpy.ndarray or torch.Tensor
        Any shape, HU.
    water_attenuation_per_mm : float
        Attenuation of water at the effective energy, 1/mm (about 0.0192 at 70 keV).

    Returns
    -------
    Same kind and shape as ``hu``, float32, 1/mm.
    """
    _check_water(water_attenuation_per_mm)
    if isinstance(hu, torch.Tensor):
        return (hu.to(torch.float32) / 1000.0 + 1.0) * water_attenuation_per_mm
    return (
        (np.asarray(hu, dtype=np.float32) / np.float32(1000.0) + np.float32(1.0)) * np.float32(water_attenuation_per_mm)
    ).astype(np.float32)


def attenuation_to_hu(attenuation: ArrayT, *, water_attenuation_per_mm: float) -> ArrayT:
    """Convert linear attenuation (1/mm) to Hounsfield units, ``HU = 1000 (mu - mu_w) / mu_w``.

    Parameters
    ----------
    attenuation : numpy.ndarray or torch.Tensor
        Any shape, 1/mm.
    water_attenuation_per_mm : float
        Attenuation of water, 1/mm.

    Returns
    -------
    Same kind and shape as ``attenuation``, float32, HU.
    """
    _check_water(water_attenuation_per_mm)
    if isinstance(attenuation, torch.Tensor):
        return (attenuation.to(torch.float32) / water_attenuation_per_mm - 1.0) * 1000.0
    mu = np.asarray(attenuation, dtype=np.float32)
    return ((mu / np.float32(water_attenuation_per_mm) - np.float32(1.0)) * np.float32(1000.0)).astype(np.float32)


# ---- input handling ------------------------------------------------------------------------------
def check_finite_sinograms(sinograms: np.ndarray | torch.Tensor, *, first_slice: int = 0) -> None:
    """Refuse sinograms holding NaN or infinity, naming the first bad (slice, view, column).

    Parameters
    ----------
    sinograms : numpy.ndarray or torch.Tensor
        ``(slices, views, cols)``.
    first_slice : int
        Absolute index of slice 0 of this block, so that a block of a larger volume names the slice of
        the volume.

    Raises
    ------
    InvalidInputError
        Some value is NaN or infinite.
    """
    t = torch.as_tensor(sinograms)
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        s, v, c = (int(i) for i in torch.nonzero(bad.reshape(-1, *t.shape[-2:]))[0])
        value = float(t.reshape(-1, *t.shape[-2:])[s, v, c])
        raise InvalidInputError(
            f"sinogram holds a non-finite value ({value}) at slice {s + first_slice}, view {v}, column {c}"
        )


def _as_block(
    data: np.ndarray | torch.Tensor,
    *,
    name: str,
    trailing: tuple[int, int],
    trailing_names: str,
    device: torch.device | None,
) -> tuple[torch.Tensor, bool, bool, torch.device]:
    """Return (float32 3-D tensor on the device, was_numpy, was_2d, device)."""
    was_numpy = not isinstance(data, torch.Tensor)
    t = data if isinstance(data, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(data))
    if t.ndim not in (2, 3):
        raise InvalidInputError(f"{name} must be 2-D or 3-D, got shape {tuple(t.shape)}")
    if tuple(t.shape[-2:]) != trailing:
        raise InvalidInputError(
            f"{name} shape {tuple(t.shape)} disagrees with the geometry: expected (..., {trailing[0]}, "
            f"{trailing[1]}) = (..., {trailing_names}), got (..., {t.shape[-2]}, {t.shape[-1]})"
        )
    if t.is_complex():
        raise InvalidInputError(f"{name} must be real, got dtype {t.dtype}")
    dev = t.device if device is None else device
    was_2d = t.ndim == 2
    t = t.to(device=dev, dtype=torch.float32)
    return (t[None] if was_2d else t), was_numpy, was_2d, dev


def _as_output(t: torch.Tensor, *, was_numpy: bool, was_2d: bool) -> np.ndarray | torch.Tensor:
    out = t[0] if was_2d else t
    return to_numpy(out) if was_numpy else out


def _check_geometry(geometry: Geometry) -> None:
    if geometry.grid.nx_pixels < 2 or geometry.grid.ny_pixels < 2:
        raise InvalidInputError(
            f"the grid needs at least 2 x 2 pixels, got {geometry.grid.ny_pixels} x {geometry.grid.nx_pixels}"
        )
    if geometry.n_detector_cols < 2:
        raise InvalidInputError(f"the detector needs at least 2 columns, got {geometry.n_detector_cols}")


def _warn_fov(geometry: Geometry) -> None:
    shortfall = geometry.fov_shortfall_mm()
    if shortfall > 0:
        warnings.warn(
            f"the detector covers a radius of {geometry.covered_radius_mm:.2f} mm at the isocentre, "
            f"{shortfall:.2f} mm short of the grid's inscribed circle ({geometry.grid.inscribed_radius_mm:.2f} "
            "mm): objects outside the covered circle are truncated and the periphery will be wrong",
            stacklevel=3,
        )


# ---- the system matrix ---------------------------------------------------------------------------
# Both matrices work on zero-padded data so that the interpolation never needs a bounds test: images get
# one row/column of zeros before and two after, ((ny + 3) * (nx + 3)) columns of A; sinograms one zero
# column on each side of the detector ((cols + 2) per view) for the Joseph adjoint, and one before and two
# after ((cols + 3)) for the FBP back-projection. A sample beyond the grid is clamped onto the zeros.
def _ray_geometry(geometry: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """A point on every ray and its unit direction, ``(views, cols, 2)`` each, float64, mm."""
    e, d, src = _view_frames(geometry)
    u = np.asarray(geometry.detector_u_mm(), dtype=np.float64)
    if not geometry.is_fan:
        point = u[None, :, None] * e[:, None, :]
        direction = np.broadcast_to(d[:, None, :], point.shape)
        return point, direction
    assert geometry.source_to_detector_mm is not None
    sdd = geometry.source_to_detector_mm
    gamma = u / sdd if geometry.detector_shape is DetectorShape.CURVED else np.arctan(u / sdd)
    direction = np.cos(gamma)[None, :, None] * d[:, None, :] + np.sin(gamma)[None, :, None] * e[:, None, :]
    point = np.broadcast_to(src[:, None, :], direction.shape)
    return point, direction


def _view_frames(geometry: Geometry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per view: detector axis e, ray direction d (views, 2) and the source (views, 2) (zeros if parallel)."""
    theta = np.deg2rad(np.asarray(geometry.view_angles_deg(), dtype=np.float64))
    e = np.stack([np.cos(theta), np.sin(theta)], axis=1)
    d = np.stack([-np.sin(theta), np.cos(theta)], axis=1)
    sid = geometry.source_to_isocenter_mm or 0.0
    return e, d, -sid * d


def _pixel_coordinates(geometry: Geometry, device: torch.device) -> torch.Tensor:
    """``(npix, 3)``: x, y of every pixel centre (mm, row-major over (y, x)) and a column of ones."""
    grid = geometry.grid
    nx, ny, pix = grid.nx_pixels, grid.ny_pixels, grid.pixel_size_mm
    x = (torch.arange(nx, device=device, dtype=torch.float32) - (nx - 1) / 2) * pix
    y = (torch.arange(ny, device=device, dtype=torch.float32) - (ny - 1) / 2) * pix
    return torch.stack([x.repeat(ny), y.repeat_interleave(nx), torch.ones(nx * ny, device=device)], dim=1)


def _pixel_columns(
    geometry: Geometry, coords: torch.Tensor, v0: int, v1: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`_pixel_columns_of` for the views ``v0:v1``."""
    return _pixel_columns_of(geometry, coords, list(range(v0, v1)))


def _pixel_columns_of(
    geometry: Geometry, coords: torch.Tensor, views: list[int]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Where the ray through each pixel centre meets the detector, ``(npix, views)`` continuous column.

    Also returns the fan-beam back-projection weight (``1 / L^2`` curved, ``(D / U)^2`` flat with ``U``
    the distance along the central ray) in the same layout, or None for parallel beam.
    """
    dev = coords.device
    e, d, src = (frame[views] for frame in _view_frames(geometry))
    nv = len(views)
    c_centre = (geometry.n_detector_cols - 1) / 2 - geometry.detector_offset_cols
    pitch = geometry.detector_pitch_mm
    if not geometry.is_fan:
        m = np.stack([e[:, 0] / pitch, e[:, 1] / pitch, np.full(len(e), c_centre)])
        return coords @ torch.as_tensor(m, dtype=torch.float32, device=dev), None
    assert geometry.source_to_detector_mm is not None
    assert geometry.source_to_isocenter_mm is not None
    sdd, sid = geometry.source_to_detector_mm, geometry.source_to_isocenter_mm
    # (p - s) . e and (p - s) . d for every pixel p and view, as one small matrix product each.
    me = np.stack([e[:, 0], e[:, 1], -(src * e).sum(1)])
    md = np.stack([d[:, 0], d[:, 1], -(src * d).sum(1)])
    along = coords @ torch.as_tensor(np.concatenate([me, md], axis=1), dtype=torch.float32, device=dev)
    along_e, along_d = along[:, :nv], along[:, nv:]
    if geometry.detector_shape is DetectorShape.CURVED:
        u = torch.atan2(along_e, along_d) * sdd
        weight = 1.0 / (along_e**2 + along_d**2)
    else:
        u = along_e / along_d * sdd
        weight = (sid / along_d) ** 2
    return u / pitch + c_centre, weight


def _interleave(first: torch.Tensor, second: torch.Tensor, rows: int) -> torch.Tensor:
    """``(rows, 2 n)``: entries of ``first`` and ``second`` alternating (two taps per sample)."""
    out = torch.empty(*first.shape, 2, device=first.device, dtype=first.dtype)
    out[..., 0] = first
    out[..., 1] = second
    return out.reshape(rows, -1)


def _csr(idx: torch.Tensor, val: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """CSR matrix with a fixed number of entries per row (int32 indices: the fast path of MKL)."""
    rows, per_row = idx.shape
    crow = torch.arange(rows + 1, device=idx.device, dtype=torch.int32) * per_row
    return torch.sparse_csr_tensor(crow, idx.reshape(-1).to(torch.int32), val.reshape(-1), size, check_invariants=False)


@dataclass
class _Operator:
    """Joseph system matrix of one geometry on one device, produced in chunks of views.

    Per ray (``views * (cols + 2)``, the two pad columns of each view having zero step length): step ``k``
    (a pixel row of a "y-dominant" ray, a column otherwise) meets the other axis at continuous pixel index
    ``f = a + b k`` and has path length ``step_mm``.
    """

    geometry: Geometry
    device: torch.device
    view_chunk: int = field(init=False)
    a: torch.Tensor = field(init=False)
    b: torch.Tensor = field(init=False)
    step_mm: torch.Tensor = field(init=False)
    y_dominant: torch.Tensor = field(init=False)
    n_steps: int = field(init=False)
    taps: int = field(init=False)
    half_window: float = field(init=False)
    coords: torch.Tensor = field(init=False)
    ray_coefficients: torch.Tensor = field(init=False)
    pixel_i: torch.Tensor = field(init=False)
    pixel_j: torch.Tensor = field(init=False)
    tap_offsets: torch.Tensor = field(init=False)
    view_offsets: torch.Tensor = field(init=False)
    parallel_hat: torch.Tensor | None = field(init=False)
    _cache: dict[tuple[str, int, int], torch.Tensor] = field(init=False, default_factory=dict)
    _cached_nnz: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        g, grid = self.geometry, self.geometry.grid
        nx, ny, pix = grid.nx_pixels, grid.ny_pixels, grid.pixel_size_mm
        point, direction = _ray_geometry(g)
        px, py = point[..., 0], point[..., 1]
        dx, dy = direction[..., 0], direction[..., 1]
        y_dom = np.abs(dy) >= np.abs(dx)
        x0, y0 = -(nx - 1) / 2 * pix, -(ny - 1) / 2 * pix
        with np.errstate(divide="ignore", invalid="ignore"):
            b_y, b_x = dx / dy, dy / dx
            a_y = (px + (y0 - py) * b_y) / pix + (nx - 1) / 2
            a_x = (py + (x0 - px) * b_x) / pix + (ny - 1) / 2
        a = np.where(y_dom, a_y, a_x)
        b = np.where(y_dom, b_y, b_x)
        step = pix / np.where(y_dom, np.abs(dy), np.abs(dx))

        def padded(v: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            v = np.pad(v, ((0, 0), (1, 1)))  # zero step length: the pad rays weigh nothing
            return torch.as_tensor(np.ascontiguousarray(v).ravel()).to(device=self.device, dtype=dtype)

        self.a, self.b, self.step_mm = padded(a), padded(b), padded(step)
        # Parallel beam: every ray of a view shares its direction, so a pixel's weight for the ray at detector
        # column c is step * max(0, 1 - s |c - c*|), with c* where the ray through its centre meets the
        # detector and s = |da/dc| the per-column shift of the sampled coordinate: no per-ray gather needed.
        self.parallel_hat = None
        if not g.is_fan and g.n_detector_cols > 1:
            scale = np.abs(a[:, 1] - a[:, 0])
            self.parallel_hat = torch.as_tensor(np.stack([scale, step[:, 0]], axis=1), dtype=torch.float32).to(
                self.device
            )
        self.y_dominant = padded(y_dom, torch.bool)
        self.n_steps = max(nx, ny)
        self.coords = _pixel_coordinates(g, self.device)
        # Every ray with a non-zero weight for a pixel passes within one pixel of its centre; bound how
        # many detector columns that spans (the candidate window of the column-wise build).
        if not g.is_fan:
            m = pix / g.detector_pitch_mm
        else:
            assert g.source_to_isocenter_mm is not None
            assert g.source_to_detector_mm is not None
            rho_min = g.source_to_isocenter_mm - grid.fov_radius_mm
            dgamma = math.asin(min(1.0, pix / rho_min))
            m = g.source_to_detector_mm * dgamma / g.detector_pitch_mm
            if g.detector_shape is DetectorShape.FLAT:
                gamma_max = max(g.half_fan_angle_rad, math.asin(grid.fov_radius_mm / g.source_to_isocenter_mm))
                m /= math.cos(min(gamma_max + dgamma, 1.5)) ** 2
            m *= 1.02
        self.half_window = m
        self.taps = max(1, math.ceil(2 * m - 1e-9))
        # The column-wise build (A^T) needs, per ray, the signed distance of a pixel (i, j) from the ray in
        # units of the sampled axis: f - (a + b k) with (k, f) = (j, i) for y-dominant rays, (i, j) otherwise.
        self.ray_coefficients = torch.stack(
            [
                self.a,
                torch.where(self.y_dominant, -1.0, self.b),
                torch.where(self.y_dominant, self.b, -1.0),
                self.step_mm,
            ],
            dim=1,
        ).contiguous()
        self.pixel_i = torch.arange(nx, device=self.device, dtype=torch.float32).repeat(ny)[:, None]
        self.pixel_j = torch.arange(ny, device=self.device, dtype=torch.float32).repeat_interleave(nx)[:, None]
        self.tap_offsets = torch.arange(self.taps, device=self.device, dtype=torch.float32)
        width = g.n_detector_cols + 2
        self.view_offsets = (torch.arange(g.n_views, device=self.device, dtype=torch.float32) * width + 1.0)[
            None, :, None
        ]
        per_view = max((g.n_detector_cols + 2) * 2 * self.n_steps, nx * ny * self.taps)
        self.view_chunk = max(1, min(g.n_views, _CHUNK_NNZ // per_view))

    def chunks(self) -> Iterator[tuple[int, int]]:
        n = self.geometry.n_views
        for v0 in range(0, n, self.view_chunk):
            yield v0, min(n, v0 + self.view_chunk)

    def _cached(self, key: tuple[str, int, int], matrix: torch.Tensor) -> torch.Tensor:
        nnz = int(matrix.values().numel())
        if self._cached_nnz + nnz <= _CACHE_NNZ:
            self._cache[key] = matrix
            self._cached_nnz += nnz
        return matrix

    def rows(self, v0: int, v1: int) -> torch.Tensor:
        """CSR ``((v1 - v0) * (cols + 2), (ny + 3) * (nx + 3))``: rows of A (padded rays and image)."""
        hit = self._cache.get(("rows", v0, v1))
        return hit if hit is not None else self._cached(("rows", v0, v1), self._build_rows(v0, v1))

    def columns(self, v0: int, v1: int) -> torch.Tensor:
        """CSR ``(ny * nx, (v1 - v0) * (cols + 2))``: A^T for views ``v0:v1`` (padded rays)."""
        hit = self._cache.get(("cols", v0, v1))
        return hit if hit is not None else self._cached(("cols", v0, v1), self._build_columns(v0, v1))

    def _build_rows(self, v0: int, v1: int) -> torch.Tensor:
        grid, width = self.geometry.grid, self.geometry.n_detector_cols + 2
        nx, ny = grid.nx_pixels, grid.ny_pixels
        r0, r1 = v0 * width, v1 * width
        n_rays = r1 - r0
        ydom = self.y_dominant[r0:r1, None]
        k = torch.arange(self.n_steps, device=self.device, dtype=torch.float32)[None, :]
        f = torch.addcmul(self.a[r0:r1, None], self.b[r0:r1, None], k)
        if nx == ny:
            f.clamp_(-1.0, float(nx))
            k_eff = k
        else:
            f = torch.minimum(f.clamp_(min=-1.0), torch.where(ydom, float(nx), float(ny)))
            k_eff = torch.minimum(k, torch.where(ydom, float(ny), float(nx)))  # beyond the grid: a zero row
        f0 = torch.floor(f)
        frac = f.sub_(f0)
        w1 = frac.mul_(self.step_mm[r0:r1, None])
        w0 = self.step_mm[r0:r1, None] - w1
        stride_k = torch.where(ydom, float(nx + 3), 1.0)
        stride_f = torch.where(ydom, 1.0, float(nx + 3))
        # Padded pixel index of the first tap: (k + 1) * stride_k + (f0 + 1) * stride_f (exact in float32).
        base = torch.addcmul(stride_k + stride_f, k_eff, stride_k)
        i0 = torch.addcmul(base, f0, stride_f).to(torch.int32)
        i1 = i0 + stride_f.to(torch.int32)
        idx = _interleave(i0, i1, n_rays)
        val = _interleave(w0, w1, n_rays)
        if self.device.type == "cuda":  # cuSPARSE wants sorted column indices in each row
            idx, order = idx.sort(dim=1)
            val = val.gather(1, order)
        return _csr(idx, val, (n_rays, (nx + 3) * (ny + 3)))

    def _build_columns(self, v0: int, v1: int) -> torch.Tensor:
        grid, ncols = self.geometry.grid, self.geometry.n_detector_cols
        nx, ny = grid.nx_pixels, grid.ny_pixels
        npix, nv, width = nx * ny, v1 - v0, ncols + 2
        cstar, _ = _pixel_columns(self.geometry, self.coords, v0, v1)  # (npix, nv)
        first = torch.floor(cstar - self.half_window).add_(1.0)
        cand = (first[..., None] + self.tap_offsets).clamp_(-1.0, float(ncols))  # (npix, nv, taps); -1, ncols: pad
        if self.parallel_hat is not None:
            scale, step = self.parallel_hat[v0:v1, 0, None], self.parallel_hat[v0:v1, 1, None]
            w = (cand - cstar[..., None]).abs_().mul_(scale).neg_().add_(1.0).relu_().mul_(step)
            w.masked_fill_((cand < 0) | (cand >= ncols), 0.0)  # the pad rays weigh nothing
            ray = cand.add_(self.view_offsets[:, :nv]).to(torch.int32)
        else:
            # Padded ray index within the chunk, exact in float32: cand + 1 + view * width.
            ray = cand.add_(self.view_offsets[:, :nv]).to(torch.int32)
            # One gather of the packed per-ray coefficients: distance = c0 + cx i + cy j, weight = step * hat.
            coef = self.ray_coefficients[v0 * width : v1 * width].index_select(0, ray.view(-1)).view(npix, -1, 4)
            dist = torch.addcmul(coef[..., 0], coef[..., 1], self.pixel_i)
            dist.addcmul_(coef[..., 2], self.pixel_j).abs_()
            w = dist.neg_().add_(1.0).relu_().mul_(coef[..., 3])
        return _csr(ray.view(npix, -1), w, (npix, nv * width))


# Four: a nightly run keeps several sites' geometries in flight at once (plus the UI preview); with two, the
# operators were rebuilt on every stage and dominated small scans (benchmarks/pipeline.py).
@lru_cache(maxsize=4)
def _operator(geometry: Geometry, device: torch.device) -> _Operator:
    return _Operator(geometry, device)


# ---- projector and back-projector ----------------------------------------------------------------
def _project(op: _Operator, x: torch.Tensor) -> torch.Tensor:
    """A x for images as columns ``(npix, slices)``; returns ``(views * cols, slices)``."""
    grid, ncols = op.geometry.grid, op.geometry.n_detector_cols
    nx, ny = grid.nx_pixels, grid.ny_pixels
    xp = torch.zeros(ny + 3, nx + 3, x.shape[1], device=x.device, dtype=torch.float32)
    xp[1:-2, 1:-2] = x.reshape(ny, nx, -1)
    xp = xp.reshape((ny + 3) * (nx + 3), -1)
    out = torch.empty(op.geometry.n_views, ncols + 2, x.shape[1], device=x.device, dtype=torch.float32)
    for v0, v1 in op.chunks():
        out[v0:v1] = (op.rows(v0, v1) @ xp).reshape(v1 - v0, ncols + 2, -1)
    return out[:, 1:-1].reshape(-1, x.shape[1])


def _back(op: _Operator, y: torch.Tensor) -> torch.Tensor:
    """A^T y for sinograms as columns ``(views * cols, slices)``; returns ``(npix, slices)``."""
    grid, ncols, n_views = op.geometry.grid, op.geometry.n_detector_cols, op.geometry.n_views
    yp = torch.nn.functional.pad(y.reshape(n_views, ncols, -1), (0, 0, 1, 1)).reshape(-1, y.shape[1])
    out = torch.zeros(grid.nx_pixels * grid.ny_pixels, y.shape[1], device=y.device, dtype=torch.float32)
    width = ncols + 2
    for v0, v1 in op.chunks():
        out += op.columns(v0, v1) @ yp[v0 * width : v1 * width]
    return out


def _images_to_columns(images: torch.Tensor) -> torch.Tensor:
    return images.reshape(images.shape[0], -1).T.contiguous()


def _columns_to_images(cols: torch.Tensor, ny: int, nx: int) -> torch.Tensor:
    return cols.T.reshape(-1, ny, nx).contiguous()


def forward_project(
    images: np.ndarray | torch.Tensor, geometry: Geometry, *, device: torch.device | None = None
) -> np.ndarray | torch.Tensor:
    """Line integrals of attenuation images along every ray of the geometry (Joseph's method).

    Parameters
    ----------
    images : numpy.ndarray or torch.Tensor
        ``(slices, ny, nx)`` (or ``(ny, nx)``) attenuation, 1/mm, on ``geometry.grid``.
    geometry : Geometry
        Acquisition geometry (parallel or fan beam, flat or curved detector).
    device : torch.device, optional
        Where to compute; default: where ``images`` lives (the CPU for numpy input).

    Returns
    -------
    numpy.ndarray or torch.Tensor
        ``(slices, views, cols)`` line integrals (mm x 1/mm, dimensionless), float32; numpy for numpy
        input, else a tensor on ``device``.

    Raises
    ------
    InvalidInputError
        Shape disagrees with ``geometry.grid``, or the image holds NaN/inf.
    """
    _check_geometry(geometry)
    grid = geometry.grid
    x, was_numpy, was_2d, dev = _as_block(
        images, name="images", trailing=(grid.ny_pixels, grid.nx_pixels), trailing_names="ny, nx", device=device
    )
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        s, j, i = (int(v) for v in torch.nonzero(bad)[0])
        raise InvalidInputError(f"images hold a non-finite value at slice {s}, y {j}, x {i}")
    op = _operator(geometry, dev)
    y = _project(op, _images_to_columns(x))
    sino = y.T.reshape(x.shape[0], geometry.n_views, geometry.n_detector_cols).contiguous()
    return _as_output(sino, was_numpy=was_numpy, was_2d=was_2d)


def back_project(
    sinograms: np.ndarray | torch.Tensor, geometry: Geometry, *, device: torch.device | None = None
) -> np.ndarray | torch.Tensor:
    """Apply the exact transpose of :func:`forward_project` (unfiltered back-projection).

    Parameters
    ----------
    sinograms : numpy.ndarray or torch.Tensor
        ``(slices, views, cols)`` (or ``(views, cols)``).
    geometry : Geometry
    device : torch.device, optional
        Default: where ``sinograms`` lives.

    Returns
    -------
    numpy.ndarray or torch.Tensor
        ``(slices, ny, nx)``, float32: ``A^T y`` with ``A`` the matrix of :func:`forward_project` (units of
        the sinogram times mm).

    Raises
    ------
    InvalidInputError
        Shape disagrees with the geometry, or NaN/inf (named by slice, view and column).
    """
    y, was_numpy, was_2d, dev = _checked_sinograms(sinograms, geometry, device, warn_fov=False)
    op = _operator(geometry, dev)
    cols = _back(op, y.reshape(y.shape[0], -1).T.contiguous())
    return _as_output(
        _columns_to_images(cols, geometry.grid.ny_pixels, geometry.grid.nx_pixels), was_numpy=was_numpy, was_2d=was_2d
    )


# ---- filtered back-projection --------------------------------------------------------------------
def _ramp_kernel(n_pad: int, tau: float) -> np.ndarray:
    """Band-limited ramp (Kak & Slaney eq. 3.61) sampled at ``tau``, circular layout, float64."""
    n = np.arange(n_pad)
    n = np.where(n <= n_pad // 2, n, n - n_pad)
    h = np.zeros(n_pad)
    h[0] = 1.0 / (4.0 * tau**2)
    odd = (n % 2) == 1
    h[odd] = -1.0 / (np.pi * n[odd] * tau) ** 2
    return h


def _window(n_freq: int, n_pad: int, filter_name: str, cutoff: float) -> np.ndarray:
    """Frequency window on the rfft grid: ``omega`` from 0 to pi (Nyquist), zero above ``cutoff * pi``."""
    omega = 2 * np.pi * np.arange(n_freq) / n_pad
    x = omega / cutoff
    if filter_name == "ram-lak":
        w = np.ones_like(x)
    elif filter_name == "shepp-logan":
        w = np.sinc(x / (2 * np.pi))
    elif filter_name == "cosine":
        w = np.cos(x / 2)
    else:  # hann
        w = 0.5 * (1 + np.cos(x))
    return np.where(omega <= cutoff * np.pi + 1e-12, w, 0.0)


def _parker_weights(geometry: Geometry, gamma: np.ndarray) -> np.ndarray | None:
    """Short-scan weights ``(views, cols)`` (already doubled), or None for a full circle."""
    if geometry.is_full_circle:
        return None
    full = math.radians(geometry.angular_range_deg)
    delta = geometry.half_fan_angle_rad
    if geometry.angular_range_deg < geometry.short_scan_min_range_deg - 1e-9:
        warnings.warn(
            f"angular range {geometry.angular_range_deg:.2f} deg is below the short-scan minimum "
            f"{geometry.short_scan_min_range_deg:.2f} deg (180 + fan angle): the data are incomplete",
            stacklevel=4,
        )
    big_delta = max((full - math.pi) / 2, delta, 1e-6)
    step = full / geometry.n_views
    beta = (np.arange(geometry.n_views) * step + step / 2)[:, None]
    g = gamma[None, :]
    # With this module's orientation the ray (beta, gamma) is also measured at (beta + pi - 2 gamma, -gamma).
    w = np.ones((geometry.n_views, gamma.size))
    rise_end = 2 * big_delta + 2 * g
    fall_start = math.pi + 2 * g
    with np.errstate(divide="ignore", invalid="ignore"):
        rise = np.sin(np.pi / 4 * beta / (big_delta + g)) ** 2
        fall = np.sin(np.pi / 4 * (math.pi + 2 * big_delta - beta) / (big_delta - g)) ** 2
    w = np.where(beta < rise_end, rise, w)
    w = np.where(beta > fall_start, fall, w)
    w = np.where((beta < 0) | (beta > math.pi + 2 * big_delta), 0.0, w)
    return 2.0 * np.nan_to_num(w, nan=0.0)


def _filter_sinograms(y: torch.Tensor, geometry: Geometry, filter_name: str, cutoff: float) -> torch.Tensor:
    """Weight and ramp-filter ``(slices, views, cols)`` along the detector (fan-beam weights included)."""
    ncols = geometry.n_detector_cols
    n_pad = max(64, 1 << math.ceil(math.log2(2 * ncols)))
    u = np.asarray(geometry.detector_u_mm(), dtype=np.float64)
    pre: np.ndarray | None = None
    if not geometry.is_fan:
        tau = geometry.detector_pitch_mm
        kernel = _ramp_kernel(n_pad, tau)
    else:
        assert geometry.source_to_isocenter_mm is not None
        assert geometry.source_to_detector_mm is not None
        sid, sdd = geometry.source_to_isocenter_mm, geometry.source_to_detector_mm
        if geometry.detector_shape is DetectorShape.CURVED:
            gamma = u / sdd
            tau = geometry.detector_pitch_mm / sdd  # radians
            n = np.arange(n_pad)
            n = np.where(n <= n_pad // 2, n, n - n_pad)
            ratio = np.ones(n_pad)
            nz = n != 0
            ratio[nz] = (n[nz] * tau / np.sin(n[nz] * tau)) ** 2
            kernel = 0.5 * ratio * _ramp_kernel(n_pad, tau)
            pre = np.broadcast_to(sid * np.cos(gamma), (geometry.n_views, ncols))
        else:
            s = u * sid / sdd
            gamma = np.arctan(u / sdd)
            tau = geometry.detector_pitch_mm * sid / sdd  # mm at the isocentre
            kernel = 0.5 * _ramp_kernel(n_pad, tau)
            pre = np.broadcast_to(sid / np.sqrt(sid**2 + s**2), (geometry.n_views, ncols))
        parker = _parker_weights(geometry, gamma)
        if parker is not None:
            pre = pre * parker
    spectrum = np.fft.rfft(kernel).real * _window(n_pad // 2 + 1, n_pad, filter_name, cutoff) * tau
    if pre is not None:
        y = y * torch.as_tensor(np.ascontiguousarray(pre), dtype=torch.float32, device=y.device)
    freq = torch.fft.rfft(y, n=n_pad, dim=-1)
    freq *= torch.as_tensor(spectrum, dtype=torch.float32, device=y.device)
    return torch.fft.irfft(freq, n=n_pad, dim=-1)[..., :ncols]


#: Sub-bin samples per detector column of the filtered projections before the FBP back-projection.
_FBP_UPSAMPLING = 8


def _rotation_partners(geometry: Geometry) -> tuple[list[int], list[int], list[int]]:
    """Pair views ``v`` with ``v + k`` where ``k`` views make a quarter turn (square grids only).

    The ray through a pixel ``p`` at view ``theta + 90 deg`` is the ray through ``p`` rotated back by
    90 deg at view ``theta`` (source and detector turn with the view), so one back-projection matrix
    serves both views: the partner's image is the base image turned by a quarter. Returns (base views,
    their partners, unpaired views).
    """
    n, grid = geometry.n_views, geometry.grid
    k_float = 90.0 / geometry.view_step_deg
    k = round(k_float)
    if grid.nx_pixels != grid.ny_pixels or abs(k_float - k) > 1e-9 or k < 1:
        return [], [], list(range(n))
    used = [False] * n
    base, partner = [], []
    for v in range(n):
        if not used[v] and v + k < n and not used[v + k]:
            used[v] = used[v + k] = True
            base.append(v)
            partner.append(v + k)
    return base, partner, [v for v in range(n) if not used[v]]


def _upsample_bins(q: torch.Tensor) -> torch.Tensor:
    """``(views, cols + 3, slices)`` zero-padded projections to ``(views * (cols + 2) * U, slices)``.

    Linear interpolation at ``U`` sub-bin positions, so that a nearest-sample lookup is linear
    interpolation to within ``1 / (2 U)`` of a bin.
    """
    frac = torch.arange(_FBP_UPSAMPLING, device=q.device, dtype=torch.float32) / _FBP_UPSAMPLING
    lo, hi = q[:, :-1, None, :], q[:, 1:, None, :]
    up = torch.lerp(lo, hi, frac[None, None, :, None])  # (views, cols + 2, U, slices)
    return up.reshape(-1, q.shape[-1])


def _fbp_back_project(q: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """Pixel-driven back-projection of filtered projections ``(views, cols, slices)``; ``(npix, slices)``.

    Linear interpolation on the detector (as ``U``-times upsampled bins read at the nearest sub-bin);
    for fan beam each pixel-view also carries the distance weight. Views a quarter turn apart share one
    sparse matrix (see :func:`_rotation_partners`).
    """
    grid, ncols, dev = geometry.grid, geometry.n_detector_cols, q.device
    nx, ny = grid.nx_pixels, grid.ny_pixels
    npix, n_slices = nx * ny, q.shape[2]
    width = (ncols + 2) * _FBP_UPSAMPLING
    qp = torch.nn.functional.pad(q, (0, 0, 1, 2))  # one zero column before the detector, two after
    coords = _pixel_coordinates(geometry, dev)
    base, partner, single = _rotation_partners(geometry)
    chunk = max(1, _CHUNK_NNZ // npix)
    out = torch.zeros(npix, n_slices, device=dev, dtype=torch.float32)
    ones: torch.Tensor | None = None
    groups = [(base[i : i + chunk], partner[i : i + chunk]) for i in range(0, len(base), chunk)]
    groups += [(single[i : i + chunk], []) for i in range(0, len(single), chunk)]
    for views, partners in groups:
        nv = len(views)
        cstar, weight = _pixel_columns_of(geometry, coords, views)
        # Padded, upsampled sample index: (c* + 1) * U rounded; c* is clamped onto the zero columns.
        cstar.clamp_(-1.0, float(ncols)).add_(1.0).mul_(_FBP_UPSAMPLING)
        offsets = torch.arange(nv, device=dev, dtype=torch.float32) * width
        idx = torch.round_(cstar).add_(offsets).to(torch.int32)
        if weight is None:
            if ones is None or ones.numel() < idx.numel():
                ones = torch.ones(idx.numel(), device=dev, dtype=torch.float32)
            val = ones[: idx.numel()].view(npix, nv)
        else:
            val = weight
        if dev.type == "cuda":
            idx, order = idx.sort(dim=1)
            val = val.gather(1, order)
        matrix = _csr(idx, val, (npix, nv * width))
        rhs = _upsample_bins(qp[views])
        if partners:
            rhs = torch.cat([rhs, _upsample_bins(qp[partners])], dim=1)
        res = matrix @ rhs
        out += res[:, :n_slices]
        if partners:
            turned = torch.rot90(res[:, n_slices:].reshape(ny, nx, n_slices), k=-1, dims=(0, 1))
            out += turned.reshape(npix, n_slices)
    return out


def fbp(
    sinograms: np.ndarray | torch.Tensor,
    geometry: Geometry,
    *,
    filter_name: FilterName = "ram-lak",
    frequency_cutoff: float = 1.0,
    device: torch.device | None = None,
) -> np.ndarray | torch.Tensor:
    """Filtered back-projection for parallel beam and for fan beam on a flat or curved detector.

    Parallel beam: ramp-filter each view and back-project with weight ``pi / views`` (a 180 or 360 deg
    scan). Fan beam: the weighted FBP of Kak & Slaney (equi-angular: ``D cos(gamma)`` pre-weight, filter
    ``(gamma / sin gamma)^2 h / 2``, ``1 / L^2`` back-projection weight; flat: pre-weight
    ``D / sqrt(D^2 + s^2)``, filter ``h / 2``, weight ``1 / U^2``), with Parker short-scan weights when the
    views cover less than 360 deg.

    Parameters
    ----------
    sinograms : numpy.ndarray or torch.Tensor
        ``(slices, views, cols)`` (or ``(views, cols)``) line integrals.
    geometry : Geometry
    filter_name : {"ram-lak", "shepp-logan", "cosine", "hann"}
        Window applied to the ramp filter.
    frequency_cutoff : float
        In (0, 1]: fraction of the Nyquist frequency above which the filter is zero; the window is
        stretched to end there.
    device : torch.device, optional
        Default: where ``sinograms`` lives.

    Returns
    -------
    numpy.ndarray or torch.Tensor
        ``(slices, ny, nx)`` attenuation, 1/mm, float32.

    Raises
    ------
    InvalidInputError
        Bad filter name or cutoff, shape disagreeing with the geometry, NaN/inf (named by slice/view).

    Warns
    -----
    UserWarning
        The detector does not cover the grid's inscribed circle (says by how many mm); a fan-beam
        angular range shorter than 180 deg + fan angle.
    """
    if filter_name not in _FILTER_NAMES:
        raise InvalidInputError(f"filter_name must be one of {_FILTER_NAMES}, got {filter_name!r}")
    if not (0 < frequency_cutoff <= 1):
        raise InvalidInputError(f"frequency_cutoff must be in (0, 1], got {frequency_cutoff!r}")
    y, was_numpy, was_2d, _ = _checked_sinograms(sinograms, geometry, device)
    q = _filter_sinograms(y, geometry, filter_name, frequency_cutoff)
    cols = _fbp_back_project(q.permute(1, 2, 0).contiguous(), geometry)
    scale = math.pi / geometry.n_views if not geometry.is_fan else math.radians(geometry.view_step_deg)
    images = _columns_to_images(cols, geometry.grid.ny_pixels, geometry.grid.nx_pixels) * scale
    return _as_output(images, was_numpy=was_numpy, was_2d=was_2d)


# ---- iterative reconstruction --------------------------------------------------------------------
def _check_iterative(iterations: int, relaxation: float) -> None:
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise InvalidInputError(f"iterations must be a non-negative integer, got {iterations!r}")
    if not (0 < relaxation < 2):
        raise InvalidInputError(f"relaxation must be in (0, 2), got {relaxation!r}")


def _checked_sinograms(
    sinograms: np.ndarray | torch.Tensor, geometry: Geometry, device: torch.device | None, *, warn_fov: bool = True
) -> tuple[torch.Tensor, bool, bool, torch.device]:
    """What every operator on sinograms checks first: the geometry, then the sinograms as a finite ``(slices,
    views, cols)`` block on its device (with whether they came as numpy and 2-D); reconstructions also warn when
    the grid exceeds the field of view (``warn_fov``; the adjoint alone does not)."""
    _check_geometry(geometry)
    y, was_numpy, was_2d, dev = _as_block(
        sinograms,
        name="sinograms",
        trailing=(geometry.n_views, geometry.n_detector_cols),
        trailing_names="views, cols",
        device=device,
    )
    check_finite_sinograms(y)
    if warn_fov:
        _warn_fov(geometry)
    return y, was_numpy, was_2d, dev


def _safe_reciprocal(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 1e-12, 1.0 / x.clamp(min=1e-12), 0.0)


def _start(
    initial: np.ndarray | torch.Tensor | None, n_slices: int, geometry: Geometry, dev: torch.device
) -> torch.Tensor:
    grid = geometry.grid
    if initial is None:
        return torch.zeros(grid.nx_pixels * grid.ny_pixels, n_slices, device=dev, dtype=torch.float32)
    x0, _, _, _ = _as_block(
        initial, name="initial", trailing=(grid.ny_pixels, grid.nx_pixels), trailing_names="ny, nx", device=dev
    )
    if x0.shape[0] != n_slices:
        raise InvalidInputError(f"initial has {x0.shape[0]} slices, the sinograms {n_slices}")
    if not bool(torch.isfinite(x0).all()):
        raise InvalidInputError("initial holds NaN or infinite values")
    return _images_to_columns(x0)


def _iterative_start(
    sinograms: np.ndarray | torch.Tensor,
    geometry: Geometry,
    *,
    iterations: int,
    relaxation: float,
    initial: np.ndarray | torch.Tensor | None,
    device: torch.device | None,
) -> tuple[torch.Tensor, bool, bool, _Operator, torch.Tensor]:
    """What SIRT and SART check and set up first: the sinograms block (with whether it came as numpy and 2-D),
    the system matrix on its device and the start image as pixel columns."""
    _check_iterative(iterations, relaxation)
    y, was_numpy, was_2d, dev = _checked_sinograms(sinograms, geometry, device)
    return y, was_numpy, was_2d, _Operator(geometry, dev), _start(initial, y.shape[0], geometry, dev)


def _columns_as_output(
    x: torch.Tensor, geometry: Geometry, *, was_numpy: bool, was_2d: bool
) -> np.ndarray | torch.Tensor:
    """Pixel columns ``(ny · nx, slices)`` back to images of the caller's kind and rank."""
    grid = geometry.grid
    return _as_output(_columns_to_images(x, grid.ny_pixels, grid.nx_pixels), was_numpy=was_numpy, was_2d=was_2d)


def _view_order(n_views: int) -> list[int]:
    """A deterministic, well-spread order of the views (golden-ratio sequence) for SART."""
    golden = (math.sqrt(5) - 1) / 2
    return sorted(range(n_views), key=lambda k: (k * golden) % 1.0)


def sirt(
    sinograms: np.ndarray | torch.Tensor,
    geometry: Geometry,
    *,
    iterations: int,
    relaxation: float = 1.0,
    nonnegative: bool = True,
    initial: np.ndarray | torch.Tensor | None = None,
    device: torch.device | None = None,
) -> np.ndarray | torch.Tensor:
    """SIRT: ``x <- P[x + relaxation C A^T R (y - A x)]`` with ``R``, ``C`` the inverse row / column sums.

    Parameters
    ----------
    sinograms : numpy.ndarray or torch.Tensor
        ``(slices, views, cols)`` (or 2-D) line integrals.
    geometry : Geometry
    iterations : int
        Number of full updates (0 returns the start image).
    relaxation : float
        In (0, 2).
    nonnegative : bool
        Clip negative attenuation to 0 after each update.
    initial : array, optional
        Start image ``(slices, ny, nx)``, 1/mm; zeros by default.
    device : torch.device, optional
        Default: where ``sinograms`` lives.

    Returns
    -------
    ``(slices, ny, nx)`` attenuation, 1/mm, float32.
    """
    y, was_numpy, was_2d, op, x = _iterative_start(
        sinograms, geometry, iterations=iterations, relaxation=relaxation, initial=initial, device=device
    )
    dev = y.device
    b = y.reshape(y.shape[0], -1).T.contiguous()
    ones_pix = torch.ones(x.shape[0], 1, device=dev)
    ones_ray = torch.ones(b.shape[0], 1, device=dev)
    inv_row = _safe_reciprocal(_project(op, ones_pix))
    inv_col = _safe_reciprocal(_back(op, ones_ray))
    for _ in range(iterations):
        x += relaxation * inv_col * _back(op, inv_row * (b - _project(op, x)))
        if nonnegative:
            x.clamp_(min=0)
    return _columns_as_output(x, geometry, was_numpy=was_numpy, was_2d=was_2d)


def sart(
    sinograms: np.ndarray | torch.Tensor,
    geometry: Geometry,
    *,
    iterations: int,
    relaxation: float = 1.0,
    nonnegative: bool = True,
    initial: np.ndarray | torch.Tensor | None = None,
    device: torch.device | None = None,
) -> np.ndarray | torch.Tensor:
    """SART (Andersen & Kak): one update per view, views in a fixed golden-ratio order.

    For view ``v``: ``x <- P[x + relaxation C_v A_v^T R_v (y_v - A_v x)]`` with ``R_v`` the inverse ray
    sums of view ``v`` and ``C_v`` the inverse column sums of ``A_v``. One iteration visits every view once.

    Parameters
    ----------
    sinograms : numpy.ndarray or torch.Tensor
        ``(slices, views, cols)`` (or 2-D) line integrals.
    geometry : Geometry
    iterations : int
        Number of sweeps over all views (0 returns the start image).
    relaxation : float
        In (0, 2).
    nonnegative : bool
        Clip negative attenuation to 0 after each view update.
    initial : array, optional
        Start image ``(slices, ny, nx)``, 1/mm; zeros by default.
    device : torch.device, optional
        Default: where ``sinograms`` lives.

    Returns
    -------
    ``(slices, ny, nx)`` attenuation, 1/mm, float32.
    """
    y, was_numpy, was_2d, op, x = _iterative_start(
        sinograms, geometry, iterations=iterations, relaxation=relaxation, initial=initial, device=device
    )
    dev = y.device
    grid, ncols = geometry.grid, geometry.n_detector_cols
    nx, ny, width = grid.nx_pixels, grid.ny_pixels, ncols + 2
    yp = torch.nn.functional.pad(y.permute(1, 2, 0), (0, 0, 1, 1))  # (views, cols + 2, slices)
    # The image lives zero-padded, as the rows of A index it; the update matrix relaxation * C_v A_v^T is
    # stored with empty rows for the pad pixels so that one in-place sparse addmm applies it.
    xp = torch.zeros(ny + 3, nx + 3, y.shape[0], device=dev, dtype=torch.float32)
    interior = xp[1:-2, 1:-2]
    interior += x.reshape(ny, nx, -1)
    xp_cols = xp.view(-1, y.shape[0])
    inside = torch.zeros(ny + 3, nx + 3, device=dev, dtype=torch.float32)
    inside[1:-2, 1:-2] = 1.0
    ones_pix = inside.view(-1, 1)
    per_pixel = op.taps
    padded_crow = torch.cat([inside.new_zeros(1), inside.view(-1).cumsum(0)]).mul_(per_pixel).to(torch.int32)
    updates: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    budget = _CACHE_NNZ
    for _ in range(iterations):
        for v in _view_order(geometry.n_views):
            hit = updates.get(v)
            if hit is None:
                rows, cols = op._build_rows(v, v + 1), op._build_columns(v, v + 1)
                inv_row = _safe_reciprocal(rows @ ones_pix)
                col_sums = cols.values().view(-1, per_pixel).sum(1, keepdim=True)
                scaled = (cols.values().view(-1, per_pixel) * (relaxation * _safe_reciprocal(col_sums))).view(-1)
                update = torch.sparse_csr_tensor(
                    padded_crow, cols.col_indices(), scaled, (xp_cols.shape[0], width), check_invariants=False
                )
                hit = (rows, inv_row, update)
                nnz = int(rows.values().numel() + scaled.numel())
                if iterations > 1 and nnz <= budget:  # reused in the next sweep
                    updates[v] = hit
                    budget -= nnz
            rows, inv_row, update = hit
            resid = inv_row * (yp[v] - rows @ xp_cols)
            xp_cols.addmm_(update, resid)
            if nonnegative:
                xp_cols.clamp_(min=0)
    return _columns_as_output(interior.reshape(nx * ny, -1), geometry, was_numpy=was_numpy, was_2d=was_2d)
