"""Low-contrast lesions: round or lobulated 3-D inserts inside the body, with exact masks.

A lesion is an ellipsoid (in-plane rotated), optionally with two or three smaller spheres (lobes)
attached. It adds a constant ``contrast_hu`` wherever its mask is set, and the mask is exactly the
set of pixel centres inside the shape *and* inside the body, so the HU change, the mask and the
per-slice label always agree. A lesion is drawn only on the slices where its cross-section is at
least :data:`MIN_SEMI_AXIS_PX` pixels across each semi-axis, which guarantees a non-empty footprint on
every slice it claims. Lesions never overlap, so each masked pixel carries one lesion's contrast.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from schemas.demo import SiteProfile
from schemas.geometry import ReconGrid
from tasks.errors import InvalidInputError

#: Smallest in-plane semi-axis of a drawn cross-section, pixels (> 1/√2 so it always holds a pixel centre).
MIN_SEMI_AXIS_PX = 0.75
#: Smallest lesion radius, pixels: on coarse grids lesions are enlarged to stay resolvable.
MIN_RADIUS_PX = 1.5
#: Soft-tissue window (organs and muscle, not fat) in which lesion centres are placed, HU.
SOFT_TISSUE_HU = (-20.0, 200.0)

FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]
TissueFn = Callable[[int], tuple[FloatArray, BoolArray]]


@dataclass(frozen=True)
class Lesion:
    """One lesion in scan coordinates (z along the slices, ``(y, x)`` as the image axes), mm."""

    centre_zyx_mm: tuple[float, float, float]
    radii_zyx_mm: tuple[float, float, float]
    angle_deg: float  # in-plane rotation of the ellipse
    lobes_zyxr_mm: tuple[tuple[float, float, float, float], ...]  # extra spheres: centre and radius
    contrast_hu: float
    first_slice: int  # first slice it is drawn on (inclusive)
    last_slice: int  # last slice it is drawn on (inclusive)

    @property
    def bounding_radius_mm(self) -> float:
        """Radius of a sphere around the centre that holds the whole lesion, mm."""
        cz, cy, cx = self.centre_zyx_mm
        r = max(self.radii_zyx_mm)
        for z, y, x, rl in self.lobes_zyxr_mm:
            r = max(r, math.dist((z, y, x), (cz, cy, cx)) + rl)
        return r

    def footprint(self, *, grid: ReconGrid, z_mm: float, slice_index: int) -> BoolArray:
        """Pixels of slice ``slice_index`` (at ``z_mm``) inside the lesion's shape (body not applied)."""
        out = np.zeros((grid.ny_pixels, grid.nx_pixels), dtype=bool)
        if not self.first_slice <= slice_index <= self.last_slice:
            return out
        px = grid.pixel_size_mm
        y = (np.arange(grid.ny_pixels) - (grid.ny_pixels - 1) / 2.0) * px
        x = (np.arange(grid.nx_pixels) - (grid.nx_pixels - 1) / 2.0) * px
        yy, xx = np.meshgrid(y, x, indexing="ij")
        cz, cy, cx = self.centre_zyx_mm
        rz, ry, rx = self.radii_zyx_mm
        a = math.radians(self.angle_deg)
        dy, dx = yy - cy, xx - cx
        u = math.cos(a) * dy + math.sin(a) * dx
        v = -math.sin(a) * dy + math.cos(a) * dx
        out |= ((z_mm - cz) / rz) ** 2 + (u / ry) ** 2 + (v / rx) ** 2 <= 1.0
        for lz, ly, lx, rl in self.lobes_zyxr_mm:
            out |= (z_mm - lz) ** 2 + (yy - ly) ** 2 + (xx - lx) ** 2 <= rl**2
        return out


def _drawn_slices(
    cz: float, rz: float, r_inplane_min: float, *, px: float, z_mm: npt.NDArray[np.float64]
) -> npt.NDArray[np.bool_]:
    """Slices where the ellipsoid's cross-section keeps both semi-axes >= MIN_SEMI_AXIS_PX."""
    ratio = min(1.0, MIN_SEMI_AXIS_PX * px / r_inplane_min)
    reach = rz * math.sqrt(1.0 - ratio**2)
    return np.abs(z_mm - cz) <= reach


def place_lesions(
    profile: SiteProfile,
    *,
    grid: ReconGrid,
    z_mm: npt.ArrayLike,
    tissue_at: TissueFn,
    rng: np.random.Generator,
    max_attempts: int = 200,
) -> tuple[Lesion, ...]:
    """Place lesions until about ``profile.lesion_prevalence_fraction`` of the slices show one.

    Each lesion is centred in soft tissue (``SOFT_TISSUE_HU``; anywhere in the body when no soft tissue
    has room) of its central slice, at least its own extent plus one pixel away from anything else,
    so it stays inside the body on every slice it spans.

    Parameters
    ----------
    profile : SiteProfile
        Prevalence, contrast and radius ranges, lobulated share.
    grid : ReconGrid
        Image grid.
    z_mm : array_like, shape (S,)
        Slice positions, mm (equally spaced).
    tissue_at : callable
        ``tissue_at(k) -> (hu, body)`` for slice ``k``: shapes (1, ny, nx), as from
        :func:`tasks.demo.anatomy.render_anatomy`.
    rng : numpy.random.Generator
        The only source of randomness.
    max_attempts : int
        Give up after this many tries (a target that cannot be met yields fewer lesions).
    """
    zs = np.asarray(z_mm, dtype=np.float64)
    n = zs.size
    if n < 1:
        raise InvalidInputError("z_mm must hold at least one slice")
    thickness = float(zs[1] - zs[0]) if n > 1 else 1.0
    px = grid.pixel_size_mm
    target = round(profile.lesion_prevalence_fraction * n)
    labelled = np.zeros(n, dtype=bool)
    lesions: list[Lesion] = []
    for _ in range(max_attempts):
        if labelled.sum() >= target:
            break
        free = np.flatnonzero(~labelled)
        k0 = int(free[rng.integers(free.size)])
        r = max(float(rng.uniform(*profile.lesion_radius_mm)), MIN_RADIUS_PX * px)
        ry, rx, rz = (r * float(f) for f in rng.uniform(0.8, 1.2, size=3))
        angle = float(rng.uniform(0.0, 180.0))
        contrast = float(rng.uniform(*profile.lesion_contrast_hu))
        cz = float(zs[k0] + rng.uniform(-0.3, 0.3) * thickness)
        lobulated = bool(rng.random() < profile.lobulated_fraction)
        n_lobes = int(rng.integers(2, 4)) if lobulated else 0
        lobe_geom = [
            (
                float(rng.uniform(0.0, 2 * math.pi)),  # direction in-plane
                float(rng.uniform(0.6, 0.9)) * min(ry, rx),  # distance from the centre
                float(rng.uniform(0.45, 0.7)) * min(ry, rx),  # lobe radius
                float(rng.uniform(-0.3, 0.3)) * rz,  # z offset
            )
            for _ in range(n_lobes)
        ]
        # Shrink along z until the lesion adds no more labelled slices than the target allows.
        while True:
            drawn = _drawn_slices(cz, rz, min(ry, rx), px=px, z_mm=zs)
            if not drawn[k0]:
                cz = float(zs[k0])
                continue
            if (labelled | drawn).sum() <= target or rz < 1e-3 * thickness:
                break
            rz *= 0.8
        extent = max(ry, rx, *(d + rl for _, d, rl, _ in lobe_geom))
        hu, body = tissue_at(k0)
        soft = body[0] & (hu[0] >= SOFT_TISSUE_HU[0]) & (hu[0] <= SOFT_TISSUE_HU[1])
        candidates = np.argwhere(ndimage.distance_transform_edt(soft) * px >= extent + px)
        if candidates.size == 0:  # coarse grids: organs too thin for the margin; any tissue will do
            candidates = np.argwhere(ndimage.distance_transform_edt(body[0]) * px >= extent + px)
        if candidates.size == 0:
            continue
        iy, ix = candidates[rng.integers(len(candidates))]
        cy = (iy - (grid.ny_pixels - 1) / 2.0) * px
        cx = (ix - (grid.nx_pixels - 1) / 2.0) * px
        lobes = tuple((cz + dz, cy + d * math.sin(phi), cx + d * math.cos(phi), rl) for phi, d, rl, dz in lobe_geom)
        idx = np.flatnonzero(drawn)
        lesion = Lesion(
            centre_zyx_mm=(cz, float(cy), float(cx)),
            radii_zyx_mm=(rz, ry, rx),
            angle_deg=angle,
            lobes_zyxr_mm=lobes,
            contrast_hu=contrast,
            first_slice=int(idx[0]),
            last_slice=int(idx[-1]),
        )
        if any(
            math.dist(lesion.centre_zyx_mm, other.centre_zyx_mm) <= lesion.bounding_radius_mm + other.bounding_radius_mm
            for other in lesions
        ):
            continue
        lesions.append(lesion)
        labelled |= drawn
    return tuple(lesions)


def insert_lesions(
    hu: npt.ArrayLike,
    body: npt.ArrayLike,
    lesions: tuple[Lesion, ...],
    *,
    grid: ReconGrid,
    z_mm: npt.ArrayLike,
    slice_indices: npt.ArrayLike,
) -> tuple[FloatArray, npt.NDArray[np.uint8]]:
    """Add each lesion's contrast inside its footprint ∩ body.

    Parameters
    ----------
    hu : array_like, shape (S, ny, nx)
        Background slices, HU (not modified).
    body : array_like of bool, shape (S, ny, nx)
        Body masks of the same slices.
    lesions : tuple of Lesion
        Non-overlapping lesions, from :func:`place_lesions`.
    grid : ReconGrid
        Image grid.
    z_mm, slice_indices : array_like, shape (S,)
        Position (mm) and index in the scan of each given slice.

    Returns
    -------
    hu : ndarray of float32, shape (S, ny, nx)
        Slices with the lesions, HU.
    masks : ndarray of uint8, shape (S, ny, nx)
        1 where a lesion was inserted.
    """
    out = np.array(hu, dtype=np.float32, copy=True)
    inside = np.asarray(body, dtype=bool)
    zs = np.atleast_1d(np.asarray(z_mm, dtype=np.float64))
    ks = np.atleast_1d(np.asarray(slice_indices, dtype=np.int64))
    if out.ndim != 3 or inside.shape != out.shape or zs.shape != ks.shape or zs.size != out.shape[0]:
        raise InvalidInputError(
            f"hu {out.shape}, body {inside.shape}, z_mm {zs.shape} and slice_indices {ks.shape} disagree"
        )
    masks = np.zeros(out.shape, dtype=np.uint8)
    for i, (z, k) in enumerate(zip(zs, ks, strict=True)):
        for lesion in lesions:
            m = lesion.footprint(grid=grid, z_mm=float(z), slice_index=int(k)) & inside[i]
            out[i][m] += np.float32(lesion.contrast_hu)
            masks[i][m] = 1
    return out, masks
