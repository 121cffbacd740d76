"""Site profiles of the demo dataset: how each simulated hospital scans and who it scans.

Sites differ on purpose (federated training must cope with it): beam and detector, number of views,
photons per view, electronic noise, detector crosstalk, anatomy mix, lesion prevalence and contrast.

A profile states its protocol at full size (a 512² grid); :meth:`SiteProfile.geometry` scales views and
detector columns to any grid so that tests run on tiny grids with the same physics. Photons per view
(``i0_photons``) do not scale: the noise of one projection is what the denoisers see.
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Annotated, Self

from pydantic import Field, model_validator

from schemas.base import FrozenModel, StageConfig
from schemas.geometry import BeamKind, DetectorShape, Geometry, ReconGrid
from schemas.ids import SiteId
from schemas.manifest import WATER_ATTENUATION_PER_MM

#: Grid edge (pixels) at which a profile's ``n_views_at_full_size`` applies.
FULL_SIZE_PIXELS = 512

#: Detector columns cover the grid's corner circle times this margin, so FBP never sees truncation.
DETECTOR_COVERAGE_MARGIN = 1.02


class DemoSize(StrEnum):
    """Preset grid sizes of the demo data (pixels per edge: 32, 64, 256, 512)."""

    TINY = "tiny"
    SMALL = "small"
    MEDIUM = "medium"
    FULL = "full"

    @property
    def pixels(self) -> int:
        return {"tiny": 32, "small": 64, "medium": 256, "full": 512}[self.value]


class AnatomyKind(StrEnum):
    """Anatomy templates: real CT slices that ship in packages, or an analytic phantom."""

    ABDOMEN = "abdomen"  # pydicom-data explicit_VR-UN.dcm, 512², 0.859 mm
    HEAD = "head"  # pydicom J2K_pixelrep_mismatch.dcm, 512², 0.431 mm
    SHEPP_LOGAN = "shepp_logan"  # the analytic modified Shepp–Logan head (tasks.phantoms), for checks


FloatRange = Annotated[
    tuple[float, float], Field(description="(low, high) bounds, low <= high; values drawn uniformly.")
]


def _check_range(name: str, bounds: tuple[float, float]) -> None:
    lo, hi = bounds
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise ValueError(f"{name} must be finite (low, high) with low <= high, got {bounds}")


class SiteProfile(FrozenModel):
    """How one simulated site acquires and whom it scans."""

    site_id: SiteId
    description: str = Field(default="", max_length=200, description="One line for tables and reports.")

    # ---- acquisition protocol ----------------------------------------------------------------
    beam: BeamKind
    detector_shape: DetectorShape = DetectorShape.FLAT
    n_views_at_full_size: int = Field(gt=0, le=20000, description="Views over 360° on a 512² grid.")
    start_angle_deg: float = Field(default=0.0, ge=-360.0, le=360.0, description="Angle of view 0, degrees.")
    source_to_isocenter_mm: float | None = Field(default=None, gt=0, le=5000, description="Fan beam only, mm.")
    source_to_detector_mm: float | None = Field(default=None, gt=0, le=5000, description="Fan beam only, mm.")
    detector_cols_per_pixel: float = Field(
        default=1.0, ge=0.5, le=4.0, description="Detector columns per image pixel at the isocentre."
    )
    display_fov_mm: float = Field(
        default=400.0, gt=50.0, le=700.0, description="Edge of the square reconstruction grid, mm."
    )
    slice_thickness_mm: float = Field(default=2.5, gt=0, le=20.0, description="Detector row pitch at isocentre, mm.")
    i0_photons: float = Field(
        gt=0, le=1e9, description="Unattenuated photons per detector bin per view (dose per view)."
    )
    electronic_noise_counts: float = Field(
        default=0.0, ge=0, le=1e4, description="Std of additive Gaussian detector noise, photons."
    )
    detector_crosstalk_fraction: float = Field(
        default=0.0,
        ge=0,
        lt=1.0 / 3.0,
        description="Share of a bin's signal seen by each neighbouring column.",
    )
    counts_floor: float = Field(
        default=0.5, gt=0, le=10.0, description="Counts are clamped to this before the log, photons."
    )
    water_attenuation_per_mm: float = Field(
        default=WATER_ATTENUATION_PER_MM, gt=0, lt=1, description="Water at the effective energy, 1/mm."
    )

    # ---- population ----------------------------------------------------------------------------
    anatomy: tuple[AnatomyKind, ...] = Field(
        default=(AnatomyKind.ABDOMEN,), min_length=1, description="Templates, one drawn uniformly per scan."
    )
    rotation_max_deg: float = Field(default=8.0, ge=0, le=45.0, description="Patient rotation, ±degrees.")
    scale_jitter_fraction: float = Field(default=0.08, ge=0, le=0.3, description="Patient size change, ±fraction.")
    deformation_mm: float = Field(default=4.0, ge=0, le=30.0, description="Std of the smooth warp, mm.")
    intensity_jitter_hu: float = Field(default=12.0, ge=0, le=100.0, description="Std of the tissue offset, HU.")
    z_correlation_mm: float = Field(
        default=40.0, gt=0, le=1000.0, description="Distance along z over which the anatomy changes, mm."
    )

    # ---- lesions -------------------------------------------------------------------------------
    lesion_prevalence_fraction: float = Field(ge=0, le=1, description="Target fraction of slices that show a lesion.")
    lesion_contrast_hu: FloatRange = Field(description="Lesion minus background, HU (negative: hypodense).")
    lesion_radius_mm: FloatRange = Field(description="Lesion radius, mm (at least 1.5 pixels on coarse grids).")
    lobulated_fraction: float = Field(default=0.3, ge=0, le=1, description="Share of lobulated lesions.")

    @model_validator(mode="after")
    def _check(self) -> Self:
        _check_range("lesion_contrast_hu", self.lesion_contrast_hu)
        _check_range("lesion_radius_mm", self.lesion_radius_mm)
        if self.lesion_radius_mm[0] <= 0:
            raise ValueError(f"lesion_radius_mm must be positive, got {self.lesion_radius_mm}")
        if max(abs(c) for c in self.lesion_contrast_hu) > 500:
            raise ValueError(f"lesion_contrast_hu {self.lesion_contrast_hu} is not a low-contrast insert (|c| <= 500)")
        if self.beam is BeamKind.FAN:
            sid, sdd = self.source_to_isocenter_mm, self.source_to_detector_mm
            if sid is None or sdd is None or sdd <= sid:
                raise ValueError("a fan-beam site needs source_to_isocenter_mm < source_to_detector_mm")
            if self.corner_radius_mm * DETECTOR_COVERAGE_MARGIN >= sid:
                raise ValueError(f"display_fov_mm {self.display_fov_mm} reaches the source orbit ({sid} mm)")
        elif self.source_to_isocenter_mm is not None or self.source_to_detector_mm is not None:
            raise ValueError("a parallel-beam site takes no source distances")
        elif self.detector_shape is not DetectorShape.FLAT:
            raise ValueError("a curved detector needs a fan beam")
        return self

    # ---- derived -------------------------------------------------------------------------------
    @property
    def corner_radius_mm(self) -> float:
        """Radius of the circle through the grid's corners, mm."""
        return self.display_fov_mm / math.sqrt(2.0)

    def grid(self, size: DemoSize | int) -> ReconGrid:
        """The square grid covering ``display_fov_mm`` with ``size`` pixels per edge."""
        n = DemoSize(size).pixels if isinstance(size, str) else int(size)
        if n < 8:
            raise ValueError(f"size must give at least 8 pixels per edge, got {size!r}")
        return ReconGrid(nx_pixels=n, ny_pixels=n, pixel_size_mm=self.display_fov_mm / n)

    def n_views(self, grid: ReconGrid) -> int:
        """Views scaled with the grid edge (even, at least 16): angular sampling keeps pace with pixels."""
        n = max(grid.nx_pixels, grid.ny_pixels)
        views = round(self.n_views_at_full_size * n / FULL_SIZE_PIXELS)
        return max(16, views + views % 2)

    def geometry(self, grid: ReconGrid, *, n_slices: int) -> Geometry:
        """The acquisition geometry of one scan of ``n_slices`` slices on ``grid``.

        Columns sample the isocentre at ``grid.pixel_size_mm / detector_cols_per_pixel`` and cover the
        grid's corner circle, so the whole grid is seen from every view.
        """
        if n_slices < 1:
            raise ValueError(f"n_slices must be >= 1, got {n_slices}")
        pitch_iso = grid.pixel_size_mm / self.detector_cols_per_pixel
        radius = grid.fov_radius_mm * DETECTOR_COVERAGE_MARGIN
        common = {
            "n_views": self.n_views(grid),
            "angular_range_deg": 360.0,
            "start_angle_deg": self.start_angle_deg,
            "n_detector_rows": n_slices,
            "detector_row_pitch_mm": self.slice_thickness_mm,
            "grid": grid,
        }
        if self.beam is BeamKind.PARALLEL:
            half = math.ceil(radius / pitch_iso)
            return Geometry(beam=BeamKind.PARALLEL, n_detector_cols=2 * half, detector_pitch_mm=pitch_iso, **common)
        sid, sdd = self.source_to_isocenter_mm, self.source_to_detector_mm
        assert sid is not None
        assert sdd is not None
        gamma_max = math.asin(min(radius / sid, 0.99))
        if self.detector_shape is DetectorShape.CURVED:
            d_gamma = pitch_iso / sid  # angular pitch: the central ray samples the isocentre at pitch_iso
            half = math.ceil(gamma_max / d_gamma)
            pitch = d_gamma * sdd
        else:
            pitch = pitch_iso * sdd / sid
            half = math.ceil(sdd * math.tan(gamma_max) / pitch)
        return Geometry(
            beam=BeamKind.FAN,
            detector_shape=self.detector_shape,
            n_detector_cols=2 * half,
            detector_pitch_mm=pitch,
            source_to_isocenter_mm=sid,
            source_to_detector_mm=sdd,
            **common,
        )


def _base_sites() -> tuple[SiteProfile, SiteProfile, SiteProfile]:
    site_a = SiteProfile(
        site_id="A",
        description="parallel beam, 720 views, high dose; hypodense lesions",
        beam=BeamKind.PARALLEL,
        n_views_at_full_size=720,
        slice_thickness_mm=2.5,
        i0_photons=1.0e5,
        electronic_noise_counts=0.0,
        detector_crosstalk_fraction=0.04,
        anatomy=(AnatomyKind.ABDOMEN,),
        lesion_prevalence_fraction=0.3,
        lesion_contrast_hu=(-60.0, -30.0),
        lesion_radius_mm=(4.0, 10.0),
        lobulated_fraction=0.3,
    )
    site_b = SiteProfile(
        site_id="B",
        description="fan beam, curved detector, 360 views, medium dose; hyperdense lesions",
        beam=BeamKind.FAN,
        detector_shape=DetectorShape.CURVED,
        n_views_at_full_size=360,
        start_angle_deg=90.0,
        source_to_isocenter_mm=595.0,
        source_to_detector_mm=1085.6,
        detector_cols_per_pixel=1.25,
        display_fov_mm=380.0,
        slice_thickness_mm=3.0,
        i0_photons=2.0e4,
        electronic_noise_counts=5.0,
        detector_crosstalk_fraction=0.08,
        anatomy=(AnatomyKind.ABDOMEN, AnatomyKind.HEAD),
        rotation_max_deg=12.0,
        lesion_prevalence_fraction=0.5,
        lesion_contrast_hu=(20.0, 45.0),
        lesion_radius_mm=(3.0, 8.0),
        lobulated_fraction=0.5,
    )
    site_c = SiteProfile(
        site_id="C",
        description="fan beam, flat detector, 1440 views, low dose per view; subtle lesions",
        beam=BeamKind.FAN,
        detector_shape=DetectorShape.FLAT,
        n_views_at_full_size=1440,
        source_to_isocenter_mm=541.0,
        source_to_detector_mm=949.0,
        display_fov_mm=420.0,
        slice_thickness_mm=1.25,
        i0_photons=5.0e3,
        electronic_noise_counts=2.0,
        detector_crosstalk_fraction=0.12,
        anatomy=(AnatomyKind.ABDOMEN,),
        scale_jitter_fraction=0.12,
        lesion_prevalence_fraction=0.15,
        lesion_contrast_hu=(-30.0, -15.0),
        lesion_radius_mm=(5.0, 12.0),
        lobulated_fraction=0.2,
    )
    return site_a, site_b, site_c


def _site_letter(index: int) -> str:
    """A, B, …, Z, AA, AB, …"""
    name = ""
    index += 1
    while index:
        index, rem = divmod(index - 1, 26)
        name = chr(ord("A") + rem) + name
    return name


def default_sites(n: int = 3) -> tuple[SiteProfile, ...]:
    """The demo sites: A, B, C as documented, then variations of them for ``n > 3``.

    Site ``k >= 3`` copies site ``k mod 3`` and, per cycle ``c = k // 3``, halves the photons per view
    ``c`` times, rotates the start angle by ``17°·c``, scales lesion prevalence by ``1 + 0.25·c`` (capped
    at 0.9) and shifts lesion contrast away from zero by ``5 HU·c``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    bases = _base_sites()
    sites: list[SiteProfile] = []
    for k in range(n):
        base = bases[k % 3]
        cycle = k // 3
        if cycle == 0:
            sites.append(base)
            continue
        lo, hi = base.lesion_contrast_hu
        shift = 5.0 * cycle * (1.0 if hi > 0 else -1.0)
        sites.append(
            base.model_copy(
                update={
                    "site_id": _site_letter(k),
                    "description": f"variation {cycle} of site {base.site_id}: {base.description}",
                    "i0_photons": base.i0_photons * 0.5**cycle,
                    "start_angle_deg": (base.start_angle_deg + 17.0 * cycle) % 360.0,
                    "lesion_prevalence_fraction": min(0.9, base.lesion_prevalence_fraction * (1 + 0.25 * cycle)),
                    "lesion_contrast_hu": (lo + shift, hi + shift),
                }
            )
        )
    # model_copy skips validation: validate the variations explicitly.
    return tuple(SiteProfile.model_validate(s.model_dump()) for s in sites)


class DemoScanConfig(StageConfig):
    """How one demo scan was made: its hash keys the idempotent rebuild of a demo store."""

    profile: SiteProfile
    grid_pixels: int = Field(ge=8, le=4096, description="Pixels per grid edge.")
    n_slices: int = Field(ge=1, le=4096, description="Slices (= detector rows).")
    seed: int = Field(ge=0, description="Root seed of the whole demo dataset.")
    site_index: int = Field(ge=0, description="Spawn key of the site under the root seed.")
    scan_index: int = Field(ge=0, description="Spawn key of the scan under its site.")
    keep_counts: bool = Field(default=False, description="Raw detector counts stored beside the line integrals.")
