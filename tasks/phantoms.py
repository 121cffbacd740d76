"""Analytic ellipse phantoms in attenuation (1/mm) and their exact line integrals (pure numpy).

A phantom is a tuple of :class:`Ellipse`; values add where ellipses overlap. :func:`render` samples it on
a :class:`~schemas.geometry.ReconGrid` (``(ny, nx)``, y grows with the row index as in
:mod:`schemas.geometry`); :func:`line_integrals` gives the exact integral along every ray of a
:class:`~schemas.geometry.Geometry` (closed form: the chord of a line through an ellipse), the oracle for
any projector. The ray conventions are those documented in :mod:`tasks.reconstruct.kernels` (detector
axis ``(cos θ, sin θ)``, rays along ``(-sin θ, cos θ)``, fan source at ``-SID (-sin θ, cos θ)``),
written out again here on purpose so that this oracle does not share code with the projector.

The modified Shepp–Logan phantom (Toft 1996) is scaled so that its "brain" (relative value 0.2) equals
water, 0.0192 /mm by default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from schemas.geometry import DetectorShape, Geometry, ReconGrid
from tasks.errors import InvalidInputError

__all__ = [
    "WATER_ATTENUATION_PER_MM",
    "Ellipse",
    "chord_integrals",
    "disk",
    "line_integrals",
    "parallel_line_integrals",
    "render",
    "shepp_logan",
]

WATER_ATTENUATION_PER_MM = 0.0192

# value, semi-axis x, semi-axis y, centre x, centre y, angle (deg), in units of the phantom radius.
_MODIFIED_SHEPP_LOGAN = (
    (1.0, 0.69, 0.92, 0.0, 0.0, 0.0),
    (-0.8, 0.6624, 0.8740, 0.0, -0.0184, 0.0),
    (-0.2, 0.1100, 0.3100, 0.22, 0.0, -18.0),
    (-0.2, 0.1600, 0.4100, -0.22, 0.0, 18.0),
    (0.1, 0.2100, 0.2500, 0.0, 0.35, 0.0),
    (0.1, 0.0460, 0.0460, 0.0, 0.1, 0.0),
    (0.1, 0.0460, 0.0460, 0.0, -0.1, 0.0),
    (0.1, 0.0460, 0.0230, -0.08, -0.605, 0.0),
    (0.1, 0.0230, 0.0230, 0.0, -0.606, 0.0),
    (0.1, 0.0230, 0.0460, 0.06, -0.605, 0.0),
)


@dataclass(frozen=True)
class Ellipse:
    """One ellipse of constant attenuation (added to whatever lies below it)."""

    value_per_mm: float
    semi_axis_x_mm: float
    semi_axis_y_mm: float
    centre_x_mm: float = 0.0
    centre_y_mm: float = 0.0
    angle_deg: float = 0.0  # rotation of the x semi-axis towards +y

    def __post_init__(self) -> None:
        if not (self.semi_axis_x_mm > 0 and self.semi_axis_y_mm > 0):
            raise InvalidInputError(
                f"ellipse semi-axes must be positive, got {self.semi_axis_x_mm!r}, {self.semi_axis_y_mm!r}"
            )


def shepp_logan(radius_mm: float, *, water_attenuation_per_mm: float = WATER_ATTENUATION_PER_MM) -> tuple[Ellipse, ...]:
    """The modified Shepp–Logan head, ``radius_mm`` being the half-height of its unit square.

    Parameters
    ----------
    radius_mm : float
        The phantom spans ``[-0.69, 0.69] x [-0.92, 0.92]`` times this, mm.
    water_attenuation_per_mm : float
        Attenuation given to the "brain" (relative 0.2); the skull gets 5 times it.

    Returns
    -------
    tuple of Ellipse
    """
    if not radius_mm > 0:
        raise InvalidInputError(f"radius_mm must be positive, got {radius_mm!r}")
    scale = water_attenuation_per_mm / 0.2
    return tuple(
        Ellipse(v * scale, a * radius_mm, b * radius_mm, x * radius_mm, y * radius_mm, phi)
        for v, a, b, x, y, phi in _MODIFIED_SHEPP_LOGAN
    )


def disk(
    radius_mm: float,
    *,
    value_per_mm: float = WATER_ATTENUATION_PER_MM,
    centre_mm: tuple[float, float] = (0.0, 0.0),
) -> tuple[Ellipse, ...]:
    """A uniform disk of ``value_per_mm`` centred at ``centre_mm = (x, y)``."""
    return (Ellipse(value_per_mm, radius_mm, radius_mm, centre_mm[0], centre_mm[1], 0.0),)


def render(ellipses: tuple[Ellipse, ...], grid: ReconGrid, *, supersample: int = 1) -> np.ndarray:
    """Sample a phantom on a grid.

    Parameters
    ----------
    ellipses : tuple of Ellipse
    grid : ReconGrid
    supersample : int
        Each pixel is the mean of ``supersample**2`` point samples (1 = pixel centres).

    Returns
    -------
    numpy.ndarray
        ``(ny, nx)`` float32 attenuation, 1/mm.
    """
    if supersample < 1:
        raise InvalidInputError(f"supersample must be >= 1, got {supersample!r}")
    pix, nx, ny = grid.pixel_size_mm, grid.nx_pixels, grid.ny_pixels
    sub = (np.arange(supersample) + 0.5) / supersample - 0.5
    x = ((np.arange(nx) - (nx - 1) / 2)[:, None] + sub[None, :]).ravel() * pix
    y = ((np.arange(ny) - (ny - 1) / 2)[:, None] + sub[None, :]).ravel() * pix
    yy, xx = np.meshgrid(y, x, indexing="ij")
    image = np.zeros_like(xx)
    for el in ellipses:
        c, s = math.cos(math.radians(el.angle_deg)), math.sin(math.radians(el.angle_deg))
        dx, dy = xx - el.centre_x_mm, yy - el.centre_y_mm
        xr, yr = dx * c + dy * s, -dx * s + dy * c
        image += np.where((xr / el.semi_axis_x_mm) ** 2 + (yr / el.semi_axis_y_mm) ** 2 <= 1.0, el.value_per_mm, 0.0)
    image = image.reshape(ny, supersample, nx, supersample).mean(axis=(1, 3))
    return image.astype(np.float32)


def chord_integrals(ellipses: tuple[Ellipse, ...], points: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """Exact integral of the phantom along lines ``point + t direction``.

    Parameters
    ----------
    ellipses : tuple of Ellipse
    points, directions : numpy.ndarray
        ``(..., 2)`` (x, y) in mm; directions need not be unit vectors.

    Returns
    -------
    numpy.ndarray
        ``(...)`` float64, value x chord length (dimensionless for 1/mm values).
    """
    p = np.asarray(points, dtype=np.float64)
    d = np.asarray(directions, dtype=np.float64)
    d = d / np.linalg.norm(d, axis=-1, keepdims=True)
    total = np.zeros(np.broadcast_shapes(p.shape, d.shape)[:-1])
    for el in ellipses:
        c, s = math.cos(math.radians(el.angle_deg)), math.sin(math.radians(el.angle_deg))
        px, py = p[..., 0] - el.centre_x_mm, p[..., 1] - el.centre_y_mm
        # Into the frame where the ellipse is the unit circle.
        qx, qy = (px * c + py * s) / el.semi_axis_x_mm, (-px * s + py * c) / el.semi_axis_y_mm
        ex = (d[..., 0] * c + d[..., 1] * s) / el.semi_axis_x_mm
        ey = (-d[..., 0] * s + d[..., 1] * c) / el.semi_axis_y_mm
        aa = ex**2 + ey**2
        bb = qx * ex + qy * ey
        cc = qx**2 + qy**2 - 1.0
        disc = np.maximum(bb**2 - aa * cc, 0.0)
        total += el.value_per_mm * 2.0 * np.sqrt(disc) / aa  # chord length in t, d being a unit vector
    return total


def parallel_line_integrals(ellipses: tuple[Ellipse, ...], geometry: Geometry) -> np.ndarray:
    """Exact parallel-beam sinogram ``(views, cols)`` at the detector column centres (Kak & Slaney 3.1).

    ``p(u, θ) = 2 ρ A B sqrt(a² - s²) / a²`` with ``a² = A² cos²(θ - φ) + B² sin²(θ - φ)`` and ``s`` the
    detector coordinate minus the projected centre.
    """
    if geometry.is_fan:
        raise InvalidInputError("parallel_line_integrals needs a parallel-beam geometry; use line_integrals")
    theta = np.deg2rad(np.asarray(geometry.view_angles_deg()))[:, None]
    u = np.asarray(geometry.detector_u_mm())[None, :]
    sino = np.zeros((theta.size, u.size))
    for el in ellipses:
        phi = math.radians(el.angle_deg)
        a2 = (el.semi_axis_x_mm * np.cos(theta - phi)) ** 2 + (el.semi_axis_y_mm * np.sin(theta - phi)) ** 2
        s = u - (el.centre_x_mm * np.cos(theta) + el.centre_y_mm * np.sin(theta))
        sino += 2 * el.value_per_mm * el.semi_axis_x_mm * el.semi_axis_y_mm * np.sqrt(np.maximum(a2 - s**2, 0)) / a2
    return sino.astype(np.float32)


def line_integrals(ellipses: tuple[Ellipse, ...], geometry: Geometry) -> np.ndarray:
    """Exact sinogram ``(views, cols)`` of a phantom along the central ray of every detector column.

    Works for parallel and fan beam (flat or curved detector), float32.
    """
    theta = np.deg2rad(np.asarray(geometry.view_angles_deg()))[:, None]
    u = np.asarray(geometry.detector_u_mm())[None, :]
    e = np.stack(np.broadcast_arrays(np.cos(theta), np.sin(theta)), axis=-1)
    d = np.stack(np.broadcast_arrays(-np.sin(theta), np.cos(theta)), axis=-1)
    if not geometry.is_fan:
        points = u[..., None] * e
        directions = np.broadcast_to(d, points.shape)
    else:
        assert geometry.source_to_isocenter_mm is not None
        assert geometry.source_to_detector_mm is not None
        sdd = geometry.source_to_detector_mm
        gamma = u / sdd if geometry.detector_shape is DetectorShape.CURVED else np.arctan(u / sdd)
        directions = np.cos(gamma)[..., None] * d + np.sin(gamma)[..., None] * e
        points = np.broadcast_to(-geometry.source_to_isocenter_mm * d, directions.shape)
    return chord_integrals(ellipses, points, directions).astype(np.float32)
