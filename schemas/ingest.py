"""What a site says about a scan it hands to ``fedscan ingest``: the YAML sidecar / CLI flags."""

from __future__ import annotations

from datetime import datetime

from pydantic import Field

from schemas.base import FrozenModel, StageConfig
from schemas.geometry import BeamKind, DetectorShape, ReconGrid
from schemas.ids import ScanId
from schemas.manifest import WATER_ATTENUATION_PER_MM, DataKind, Labels


class GeometrySpec(FrozenModel):
    """Geometry as a site writes it: sizes may be left out and are then taken from the data.

    Sizes that are given must agree with the data (a view count that disagrees is refused).
    """

    beam: BeamKind = BeamKind.PARALLEL
    detector_shape: DetectorShape = DetectorShape.FLAT
    n_views: int | None = Field(default=None, gt=0)
    n_detector_cols: int | None = Field(default=None, gt=0)
    n_detector_rows: int | None = Field(default=None, gt=0)
    angular_range_deg: float = Field(default=360.0, gt=0, le=360.0, allow_inf_nan=False)
    start_angle_deg: float = Field(default=0.0, allow_inf_nan=False)
    detector_pitch_mm: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    detector_row_pitch_mm: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    detector_offset_cols: float = Field(default=0.0, allow_inf_nan=False)
    source_to_isocenter_mm: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    source_to_detector_mm: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    grid: ReconGrid | None = Field(
        default=None,
        description="Reconstruction grid; default: as many pixels as detector columns at the isocentre pitch.",
    )


class IngestSidecar(FrozenModel):
    """The YAML sidecar next to a source (``<source>.yaml`` or ``fedscan.yaml`` in its folder)."""

    scan_id: ScanId | None = Field(
        default=None,
        description="The site's own scan id; must not look like identity. Default: a keyed id (never the file name).",
    )
    data_kind: DataKind = Field(
        default=DataKind.LINE_INTEGRALS,
        description="What the array holds. A sidecar (or --data-kind / geometry flags, or a site default) must "
        "exist for arrays: fedscan never guesses for an array with none.",
    )
    i0_photons: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    water_attenuation_per_mm: float = Field(default=WATER_ATTENUATION_PER_MM, gt=0, lt=1)
    geometry: GeometrySpec | None = None
    acquisition_time: datetime | None = None
    labels: Labels = Field(default_factory=dict)
    npz_key: str | None = Field(default=None, description="Array inside an NPZ file; default 'projections'.")
    flats: str | None = Field(
        default=None,
        min_length=1,
        description="Flat-field (open beam) images: NPY/NPZ/TIFF path relative to the source's folder. An NPZ "
        "source's own 'flats' member is used when this is not set.",
    )
    darks: str | None = Field(
        default=None, min_length=1, description="Dark-field images, as ``flats``; optional (no dark current)."
    )
    transmission_floor: float = Field(
        default=1e-5,
        gt=0,
        lt=1,
        description="Flat/dark normalisation clamps (P − D)/(F − D) to at least this (counted in the manifest).",
    )


class IngestConfig(StageConfig):
    """The ingest stage's config: what was read and how (its hash makes reruns idempotent)."""

    source_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    reader: str = Field(description="npy | npz | tiff | tiff-series | dicom-series | dicom-ct-pd")
    data_kind: DataKind
    counts_floor: float = Field(
        default=0.5, gt=0, description="Counts below this are clamped before the log (zero-count bins), photons."
    )
    transmission_floor: float | None = Field(
        default=None, gt=0, lt=1, description="Set when flats/darks normalised the projections (see the sidecar)."
    )
