"""Anatomy of the demo patients: real CT slices, warped smoothly per patient and along z.

The templates are real 512² CT slices that ship in packages (no download): the abdomen of
pydicom-data's ``explicit_VR-UN.dcm`` and the head of pydicom's ``J2K_pixelrep_mismatch.dcm``; for
checks, the analytic modified Shepp–Logan head of :mod:`tasks.phantoms` serves as a template too. Each
is converted to HU, cleaned (everything outside the largest connected body component, including the CT
couch and the scanner's padding value, becomes air) and cached read-only.

A :class:`Patient` holds smooth random transforms sampled at knots along z: rotation, anisotropic
scale, shift and a free-form warp on a coarse control grid, all interpolated with cubic splines, so
consecutive slices of one patient differ slowly while different patients differ clearly.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from schemas.demo import AnatomyKind, SiteProfile
from schemas.geometry import ReconGrid
from tasks.errors import InvalidInputError

#: Template file of each anatomy (found with ``pydicom.data.get_testdata_file``).
TEMPLATE_FILES: dict[AnatomyKind, str] = {
    AnatomyKind.ABDOMEN: "explicit_VR-UN.dcm",
    AnatomyKind.HEAD: "J2K_pixelrep_mismatch.dcm",
}
AIR_HU = -1000.0
#: Pixels above this belong to the body (or the couch) before the connected-component cleaning.
BODY_THRESHOLD_HU = -500.0
#: Edge of the coarse control grid of the free-form warp (control points span the grid's FOV).
WARP_CONTROL_POINTS = 5

FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class AnatomyTemplate:
    """One cleaned template slice (read-only arrays)."""

    kind: AnatomyKind
    hu: FloatArray  # (H, W) HU, air (-1000) outside the body
    body: BoolArray  # (H, W) body mask
    pixel_size_mm: float
    centre_yx_mm: tuple[float, float]  # body centroid relative to the image centre, mm
    body_radius_mm: float  # largest distance of a body pixel from the centroid, mm


def body_mask(hu: npt.ArrayLike, *, threshold_hu: float = BODY_THRESHOLD_HU) -> BoolArray:
    """The patient's body in one HU slice: the largest connected component above ``threshold_hu``,
    holes filled (lungs, bowel gas). Smaller components (the couch, cables, padding) are dropped.

    Parameters
    ----------
    hu : array_like, shape (ny, nx)
        One slice in Hounsfield units.
    threshold_hu : float
        Tissue threshold, HU.

    Returns
    -------
    ndarray of bool, shape (ny, nx)
    """
    image = np.asarray(hu)
    if image.ndim != 2:
        raise InvalidInputError(f"body_mask needs one 2-D slice, got shape {image.shape}")
    labels, n = ndimage.label(image > threshold_hu)
    if n == 0:
        return np.zeros(image.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    largest = labels == int(np.argmax(sizes))
    return np.asarray(ndimage.binary_fill_holes(largest), dtype=bool)


def _read_dicom_hu(name: str) -> tuple[npt.NDArray[np.float32], float]:
    """HU and pixel size (mm) of a CT slice that ships with pydicom / pydicom-data."""
    import pydicom
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        raise InvalidInputError(f"CT template {name!r} not found: is pydicom-data installed?")
    ds = pydicom.dcmread(path)
    slope = float(ds.get("RescaleSlope", 1.0))
    intercept = float(ds.get("RescaleIntercept", 0.0))
    raw = np.asarray(ds.pixel_array, dtype=np.float32) * np.float32(slope) + np.float32(intercept)
    spacing = [float(v) for v in ds.PixelSpacing]
    if not math.isclose(spacing[0], spacing[1], rel_tol=1e-3):
        raise InvalidInputError(f"template {name!r} has non-square pixels {spacing}")
    # Values below air are padding outside the scanner's field of view (the head uses -2000).
    return np.clip(raw, AIR_HU, 3071.0), spacing[0]


def _shepp_logan_hu() -> tuple[npt.NDArray[np.float32], float]:
    """The modified Shepp–Logan head of :mod:`tasks.phantoms` (half-height 110 mm) in HU, 0.5 mm pixels."""
    from tasks.phantoms import WATER_ATTENUATION_PER_MM, render, shepp_logan

    px = 0.5
    mu = render(shepp_logan(110.0), ReconGrid(nx_pixels=512, ny_pixels=512, pixel_size_mm=px), supersample=2)
    return ((mu / WATER_ATTENUATION_PER_MM - 1.0) * 1000.0).astype(np.float32), px


@functools.cache
def load_template(kind: AnatomyKind) -> AnatomyTemplate:
    """Read, convert to HU and clean one template slice (cached; arrays are read-only)."""
    kind = AnatomyKind(kind)
    raw, px = _shepp_logan_hu() if kind is AnatomyKind.SHEPP_LOGAN else _read_dicom_hu(TEMPLATE_FILES[kind])
    body = body_mask(raw)
    hu = np.where(body, raw, np.float32(AIR_HU)).astype(np.float32)
    h, w = hu.shape
    yy, xx = np.nonzero(body)
    cy = (yy.mean() - (h - 1) / 2.0) * px
    cx = (xx.mean() - (w - 1) / 2.0) * px
    radius = float(np.sqrt(((yy - yy.mean()) ** 2 + (xx - xx.mean()) ** 2).max()) * px + px)
    hu.flags.writeable = False
    body.flags.writeable = False
    return AnatomyTemplate(
        kind=kind,
        hu=hu,
        body=body,
        pixel_size_mm=px,
        centre_yx_mm=(float(cy), float(cx)),
        body_radius_mm=radius,
    )


@functools.lru_cache(maxsize=16)
def _smoothed(kind: AnatomyKind, sigma_px: float) -> tuple[FloatArray, FloatArray]:
    """Template HU and body fraction, Gaussian-smoothed against aliasing when sampled coarsely."""
    t = load_template(kind)
    body = t.body.astype(np.float32)
    if sigma_px <= 0:
        return t.hu, body
    hu = ndimage.gaussian_filter(t.hu, sigma_px, mode="nearest").astype(np.float32)
    return hu, ndimage.gaussian_filter(body, sigma_px, mode="nearest").astype(np.float32)


@dataclass(frozen=True)
class Patient:
    """Smooth random transforms of one template, sampled at knots along z (all mm/degrees)."""

    kind: AnatomyKind
    knot_z0_mm: float  # z of knot 0
    knot_spacing_mm: float
    rotation_deg: FloatArray  # (K,)
    scale_yx: FloatArray  # (K, 2) size factors (>1 = larger patient)
    shift_yx_mm: FloatArray  # (K, 2)
    warp_yx_mm: FloatArray  # (2, K, G, G) displacement on the control grid
    hu_gain: float
    hu_offset: float
    fit_scale: float  # global shrink so the body stays inside the grid's inscribed circle


def slice_z_mm(n_slices: int, slice_thickness_mm: float) -> npt.NDArray[np.float64]:
    """z of each slice centre, mm (slice 0 at z = 0)."""
    return np.arange(n_slices, dtype=np.float64) * slice_thickness_mm


def sample_patient(profile: SiteProfile, *, grid: ReconGrid, n_slices: int, rng: np.random.Generator) -> Patient:
    """Draw one patient for ``profile``: template, transforms along z and intensity change.

    Parameters
    ----------
    profile : SiteProfile
        The site (anatomy mix, rotation, scale, warp and intensity jitter, slice thickness).
    grid : ReconGrid
        The grid the patient will be rendered on (sets how far the body may extend).
    n_slices : int
        Slices of the scan (sets how many knots along z are drawn).
    rng : numpy.random.Generator
        The only source of randomness.
    """
    if n_slices < 1:
        raise InvalidInputError(f"n_slices must be >= 1, got {n_slices}")
    kind = profile.anatomy[int(rng.integers(len(profile.anatomy)))]
    template = load_template(kind)
    spacing = profile.z_correlation_mm
    extent = (n_slices - 1) * profile.slice_thickness_mm
    n_knots = math.ceil(extent / spacing) + 5  # two knots of margin each side for the cubic spline
    z0 = -2.0 * spacing

    jitter = profile.scale_jitter_fraction
    rot_max = profile.rotation_max_deg
    half_fov = grid.inscribed_radius_mm
    shift_max = 0.04 * half_fov
    rotation = rng.uniform(-rot_max, rot_max) + rng.normal(0.0, rot_max / 4.0 + 1e-9, n_knots)
    base_scale = 1.0 + rng.uniform(-jitter, jitter) + rng.uniform(-jitter / 2, jitter / 2, size=2)
    scale = base_scale[None, :] * (1.0 + np.clip(rng.normal(0.0, jitter / 4.0 + 1e-9, (n_knots, 2)), -jitter, jitter))
    shift = rng.uniform(-shift_max, shift_max, size=2)[None, :] + np.clip(
        rng.normal(0.0, shift_max / 4.0 + 1e-9, (n_knots, 2)), -shift_max / 2, shift_max / 2
    )
    g = WARP_CONTROL_POINTS
    warp = np.clip(
        rng.normal(0.0, profile.deformation_mm + 1e-9, (2, n_knots, g, g)),
        -3 * profile.deformation_mm,
        3 * profile.deformation_mm,
    )
    gain = float(np.clip(1.0 + rng.normal(0.0, 0.03), 0.9, 1.1))
    offset = float(np.clip(rng.normal(0.0, profile.intensity_jitter_hu + 1e-9), -40.0, 40.0))
    # Largest extent the transforms can give the body: keep it inside the grid's inscribed circle.
    worst = template.body_radius_mm * float(scale.max()) + 1.5 * shift_max + 3 * profile.deformation_mm
    fit = min(1.0, 0.92 * half_fov / worst)
    return Patient(
        kind=kind,
        knot_z0_mm=z0,
        knot_spacing_mm=spacing,
        rotation_deg=rotation.astype(np.float32),
        scale_yx=scale.astype(np.float32),
        shift_yx_mm=shift.astype(np.float32),
        warp_yx_mm=warp.astype(np.float32),
        hu_gain=gain,
        hu_offset=offset,
        fit_scale=fit,
    )


def _spline_at(values: npt.NDArray[np.floating], t: float) -> npt.NDArray[np.float64]:
    """Cubic-spline value of ``values`` (knots along axis 0) at knot coordinate ``t``."""
    flat = np.asarray(values, dtype=np.float64).reshape(values.shape[0], -1)
    out = np.empty(flat.shape[1], dtype=np.float64)
    for j in range(flat.shape[1]):
        out[j] = ndimage.map_coordinates(flat[:, j], [[t]], order=3, mode="nearest")[0]
    return out.reshape(values.shape[1:])


def render_anatomy(patient: Patient, *, grid: ReconGrid, z_mm: npt.ArrayLike) -> tuple[FloatArray, BoolArray]:
    """The patient's HU slices and body masks at the given z positions.

    Parameters
    ----------
    patient : Patient
        From :func:`sample_patient`.
    grid : ReconGrid
        Output grid; pixel centres symmetric about the isocentre, axes ``(y, x)``.
    z_mm : array_like, shape (S,)
        Slice positions, mm.

    Returns
    -------
    hu : ndarray of float32, shape (S, ny, nx)
        Hounsfield units, -1000 outside the body.
    body : ndarray of bool, shape (S, ny, nx)
        Body masks.
    """
    zs = np.atleast_1d(np.asarray(z_mm, dtype=np.float64))
    template = load_template(patient.kind)
    ny, nx, px = grid.ny_pixels, grid.nx_pixels, grid.pixel_size_mm
    step = px / (template.pixel_size_mm * patient.fit_scale)  # template pixels per output pixel
    sigma = round(0.4 * step, 2) if step > 1.0 else 0.0
    hu_src, body_src = _smoothed(patient.kind, sigma)
    th, tw = template.hu.shape

    y = (np.arange(ny) - (ny - 1) / 2.0) * px
    x = (np.arange(nx) - (nx - 1) / 2.0) * px
    yy, xx = np.meshgrid(y, x, indexing="ij")
    half = grid.inscribed_radius_mm
    g = WARP_CONTROL_POINTS
    gy = np.clip((yy + half) / (2 * half) * (g - 1), 0, g - 1)
    gx = np.clip((xx + half) / (2 * half) * (g - 1), 0, g - 1)

    hu_out = np.empty((zs.size, ny, nx), dtype=np.float32)
    body_out = np.empty((zs.size, ny, nx), dtype=bool)
    for i, z in enumerate(zs):
        t = (z - patient.knot_z0_mm) / patient.knot_spacing_mm
        theta = math.radians(float(_spline_at(patient.rotation_deg, t)))
        sy, sx = (_spline_at(patient.scale_yx, t) * patient.fit_scale).tolist()
        dy, dx = _spline_at(patient.shift_yx_mm, t).tolist()
        qy, qx = yy - dy, xx - dx
        cos, sin = math.cos(theta), math.sin(theta)
        # Inverse transform: rotate back, undo the scale, then warp in template millimetres.
        ry = (cos * qy + sin * qx) / sy
        rx = (-sin * qy + cos * qx) / sx
        coords = [np.full(yy.shape, t), gy, gx]
        wy = ndimage.map_coordinates(patient.warp_yx_mm[0].astype(np.float64), coords, order=3, mode="nearest")
        wx = ndimage.map_coordinates(patient.warp_yx_mm[1].astype(np.float64), coords, order=3, mode="nearest")
        iy = (ry + wy + template.centre_yx_mm[0]) / template.pixel_size_mm + (th - 1) / 2.0
        ix = (rx + wx + template.centre_yx_mm[1]) / template.pixel_size_mm + (tw - 1) / 2.0
        hu = ndimage.map_coordinates(hu_src, [iy, ix], order=1, mode="constant", cval=AIR_HU)
        body = ndimage.map_coordinates(body_src, [iy, ix], order=1, mode="constant", cval=0.0) > 0.5
        tissue = np.maximum(patient.hu_gain * hu + patient.hu_offset, AIR_HU)
        hu_out[i] = np.where(body, tissue, AIR_HU)
        body_out[i] = body
    return hu_out, body_out
