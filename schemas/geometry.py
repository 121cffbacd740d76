"""Acquisition and reconstruction geometry.

Conventions (shared by every projector, reconstructor and the demo data):

* A scan is a stack of 2-D acquisitions, one per detector row: detector row ``r`` is the sinogram
  of reconstructed slice ``r`` (parallel-beam, or fan-beam per row; no cone-beam divergence).
* Projections are stored as ``(views, rows, cols)``; view ``k`` is taken at angle
  ``start_angle_deg + k * angular_range_deg / n_views`` (the end angle is excluded).
* Column ``c`` sits at detector coordinate ``u_c = (c - (n_cols - 1) / 2 + detector_offset_cols) * pitch``.
  For a flat fan-beam detector ``u`` is a distance along the detector; for a curved (equi-angular)
  detector ``u`` is an arc length on the circle of radius ``source_to_detector_mm`` around the source.
* Image axes are ``(y, x)`` with pixel centres symmetric about the isocentre; x grows with the
  column index, y with the row index.
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Annotated, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class BeamKind(StrEnum):
    """Shape of the X-ray beam within one slice."""

    PARALLEL = "parallel"
    FAN = "fan"


class DetectorShape(StrEnum):
    """Shape of a fan-beam detector row."""

    FLAT = "flat"
    CURVED = "curved"


PositiveInt = Annotated[int, Field(gt=0)]
PositiveMm = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class ReconGrid(BaseModel):
    """The reconstruction grid of one slice (square pixels)."""

    model_config = _FROZEN

    nx_pixels: PositiveInt = Field(description="Image columns (x), pixels.")
    ny_pixels: PositiveInt = Field(description="Image rows (y), pixels.")
    pixel_size_mm: PositiveMm = Field(description="Edge length of one square pixel, mm.")

    @property
    def fov_radius_mm(self) -> float:
        """Radius of the circle that touches the grid's corners, mm."""
        return 0.5 * math.hypot(self.nx_pixels, self.ny_pixels) * self.pixel_size_mm

    @property
    def inscribed_radius_mm(self) -> float:
        """Radius of the largest circle inside the grid, mm."""
        return 0.5 * min(self.nx_pixels, self.ny_pixels) * self.pixel_size_mm


class Geometry(BaseModel):
    """Parallel- or fan-beam acquisition geometry plus the reconstruction grid.

    Every size is positive, every distance in mm, every angle in degrees. Fan-beam geometries need
    ``source_to_isocenter_mm < source_to_detector_mm``; parallel-beam geometries must not set them.
    """

    model_config = _FROZEN

    beam: BeamKind = Field(description="parallel or fan.")
    detector_shape: DetectorShape = Field(
        default=DetectorShape.FLAT,
        description="flat or curved (equi-angular, centred on the source); fan-beam only.",
    )
    n_views: PositiveInt = Field(description="Number of projection angles.")
    angular_range_deg: float = Field(
        default=360.0, gt=0, le=360.0, allow_inf_nan=False, description="Angular span covered by the views, degrees."
    )
    start_angle_deg: float = Field(default=0.0, allow_inf_nan=False, description="Angle of view 0, degrees.")
    n_detector_cols: PositiveInt = Field(description="Detector columns (bins) per row.")
    n_detector_rows: PositiveInt = Field(default=1, description="Detector rows = reconstructed slices.")
    detector_pitch_mm: PositiveMm = Field(
        description="Column pitch at the detector, mm (arc length for a curved detector)."
    )
    detector_row_pitch_mm: PositiveMm = Field(
        default=1.0, description="Row pitch at the isocentre = slice thickness, mm."
    )
    detector_offset_cols: float = Field(
        default=0.0,
        ge=-1e4,
        le=1e4,
        allow_inf_nan=False,
        description="Shift of the central ray from the detector centre, in columns.",
    )
    source_to_isocenter_mm: PositiveMm | None = Field(
        default=None, description="Source to rotation axis, mm (fan-beam only)."
    )
    source_to_detector_mm: PositiveMm | None = Field(
        default=None, description="Source to detector (centre), mm (fan-beam only)."
    )
    grid: ReconGrid = Field(description="Reconstruction grid of each slice.")

    @model_validator(mode="after")
    def _check_consistency(self) -> Self:
        if self.beam is BeamKind.FAN:
            sid, sdd = self.source_to_isocenter_mm, self.source_to_detector_mm
            if sid is None or sdd is None:
                raise ValueError("fan-beam geometry needs source_to_isocenter_mm and source_to_detector_mm")
            if sdd <= sid:
                raise ValueError(
                    f"source_to_detector_mm ({sdd}) must exceed source_to_isocenter_mm ({sid}): "
                    "the detector must lie beyond the rotation axis"
                )
            if self.grid.fov_radius_mm >= sid:
                raise ValueError(
                    f"the reconstruction grid (corner radius {self.grid.fov_radius_mm:.1f} mm) reaches the "
                    f"source orbit (source_to_isocenter_mm={sid})"
                )
            half_fan = self.half_fan_angle_rad
            if not half_fan < math.pi / 2:
                raise ValueError(f"detector spans a fan of {2 * math.degrees(half_fan):.1f} deg; must be < 180")
        else:
            if self.source_to_isocenter_mm is not None or self.source_to_detector_mm is not None:
                raise ValueError("parallel-beam geometry takes no source distances")
            if self.detector_shape is not DetectorShape.FLAT:
                raise ValueError("a curved detector needs a fan beam")
        return self

    # ---- derived quantities -----------------------------------------------------------------
    @property
    def is_fan(self) -> bool:
        return self.beam is BeamKind.FAN

    @property
    def magnification(self) -> float:
        """Detector-to-isocentre magnification (1 for parallel beam)."""
        if not self.is_fan:
            return 1.0
        assert self.source_to_detector_mm is not None
        assert self.source_to_isocenter_mm is not None
        return self.source_to_detector_mm / self.source_to_isocenter_mm

    @property
    def view_step_deg(self) -> float:
        """Angle between consecutive views, degrees."""
        return self.angular_range_deg / self.n_views

    @property
    def is_full_circle(self) -> bool:
        """True when the views cover 360 deg, so the view axis wraps around (periodic)."""
        return math.isclose(self.angular_range_deg, 360.0, rel_tol=0, abs_tol=1e-9)

    def view_angles_deg(self) -> list[float]:
        """Angle of every view, degrees."""
        return [self.start_angle_deg + k * self.view_step_deg for k in range(self.n_views)]

    def detector_u_mm(self) -> list[float]:
        """Detector coordinate of every column centre, mm (arc length for a curved detector)."""
        c0 = (self.n_detector_cols - 1) / 2.0 - self.detector_offset_cols
        return [(c - c0) * self.detector_pitch_mm for c in range(self.n_detector_cols)]

    @property
    def half_fan_angle_rad(self) -> float:
        """Half the angle the detector subtends at the source (0 for parallel beam)."""
        if not self.is_fan:
            return 0.0
        assert self.source_to_detector_mm is not None
        u_max = max(abs(u) for u in self.detector_u_mm()) + 0.5 * self.detector_pitch_mm
        if self.detector_shape is DetectorShape.CURVED:
            return u_max / self.source_to_detector_mm
        return math.atan(u_max / self.source_to_detector_mm)

    @property
    def covered_radius_mm(self) -> float:
        """Radius at the isocentre that every view's detector covers, mm."""
        if not self.is_fan:
            c0 = (self.n_detector_cols - 1) / 2.0 - self.detector_offset_cols
            lo = (0 - c0 - 0.5) * self.detector_pitch_mm
            hi = (self.n_detector_cols - 1 - c0 + 0.5) * self.detector_pitch_mm
            return min(-lo, hi)
        assert self.source_to_isocenter_mm is not None
        return self.source_to_isocenter_mm * math.sin(self.half_fan_angle_rad)

    def fov_shortfall_mm(self) -> float:
        """How far the grid's inscribed circle reaches beyond what the detector covers, mm (0 if covered)."""
        return max(0.0, self.grid.inscribed_radius_mm - self.covered_radius_mm)

    @property
    def short_scan_min_range_deg(self) -> float:
        """Minimal angular range for exact data: 180 deg (+ fan angle for fan beam)."""
        return 180.0 + 2.0 * math.degrees(self.half_fan_angle_rad)
