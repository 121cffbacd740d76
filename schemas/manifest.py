"""What a site knows about one scan, and what each stage records about its own run."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Self

from pydantic import Field, field_validator, model_validator

from schemas.base import FrozenModel
from schemas.geometry import Geometry, ReconGrid

Identifier = Annotated[
    str,
    Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
        description="Letters, digits, '.', '_' or '-'; safe as a path component.",
    ),
]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="Hex sha256 digest.")]
LabelValue = str | int | float | bool

#: Label keys that could carry a patient identity; a manifest must never hold them.
_IDENTIFYING_KEY = re.compile(
    r"(patient|name|birth|dob|mrn|address|phone|ssn|accession|physician|operator)", re.IGNORECASE
)

#: Linear attenuation of water near 70 keV, 1/mm (the usual effective energy of a 120 kVp beam).
WATER_ATTENUATION_PER_MM = 0.0192


class DataKind(StrEnum):
    """What the stored numbers are."""

    COUNTS = "counts"  # detected photons; line integrals follow as log(I0 / counts)
    LINE_INTEGRALS = "line_integrals"  # -log(I / I0), dimensionless
    HU_IMAGES = "hu_images"  # reconstructed images in Hounsfield units (sites without projections)


class SourceFile(FrozenModel):
    """One input file, identified by content, never modified by fedscan."""

    name: str = Field(min_length=1, description="File name relative to the ingested path.")
    sha256: Sha256
    size_bytes: int = Field(ge=0, description="File size, bytes.")


class ScanManifest(FrozenModel):
    """One scan of one site. Holds no patient identity: labels with identifying keys are refused."""

    scan_id: Identifier
    site_id: Identifier
    modality: str = Field(default="CT", pattern=r"^[A-Z]{2,4}$", description="DICOM modality code.")
    data_kind: DataKind
    geometry: Geometry | None = Field(default=None, description="Acquisition geometry; required for projection data.")
    image_grid: ReconGrid | None = Field(
        default=None, description="Grid of stored images (hu_images); defaults to geometry.grid."
    )
    slice_thickness_mm: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    i0_photons: float | None = Field(
        default=None, gt=0, allow_inf_nan=False, description="Unattenuated photons per detector bin per view."
    )
    water_attenuation_per_mm: float = Field(
        default=WATER_ATTENUATION_PER_MM, gt=0, lt=1, description="Water attenuation used for HU, 1/mm."
    )
    source_files: tuple[SourceFile, ...] = Field(default=(), description="Ingested files, by content.")
    source_sha256: Sha256 | None = Field(
        default=None, description="Digest over all source files (name + content); the idempotency key."
    )
    acquisition_time: datetime | None = None
    labels: dict[str, LabelValue] = Field(default_factory=dict, description="Free-form, non-identifying.")

    @field_validator("labels")
    @classmethod
    def _no_identifying_labels(cls, labels: dict[str, LabelValue]) -> dict[str, LabelValue]:
        bad = sorted(k for k in labels if _IDENTIFYING_KEY.search(k))
        if bad:
            raise ValueError(f"labels must not identify a patient; refused keys: {bad}")
        return labels

    @model_validator(mode="after")
    def _kind_needs(self) -> Self:
        if self.data_kind in (DataKind.COUNTS, DataKind.LINE_INTEGRALS) and self.geometry is None:
            raise ValueError(f"data_kind={self.data_kind.value} needs a geometry")
        if self.data_kind is DataKind.COUNTS and self.i0_photons is None:
            raise ValueError("data_kind=counts needs i0_photons")
        if self.data_kind is DataKind.HU_IMAGES and self.grid is None:
            raise ValueError("data_kind=hu_images needs image_grid (or a geometry)")
        return self

    @property
    def grid(self) -> ReconGrid | None:
        """The image grid of this scan's volumes."""
        if self.image_grid is not None:
            return self.image_grid
        return self.geometry.grid if self.geometry is not None else None


class StageStatus(StrEnum):
    COMPLETE = "complete"


class ProvenanceRecord(FrozenModel):
    """Written by a stage after its last chunk; its presence is what marks the stage done."""

    stage: str = Field(pattern=r"^[a-z][a-z0-9_-]*$")
    status: StageStatus = StageStatus.COMPLETE
    config: dict[str, Any] = Field(description="The stage config as JSON.")
    config_hash: str = Field(pattern=r"^[0-9a-f]{16}$")
    inputs: dict[str, str] = Field(
        default_factory=dict,
        description="Upstream stage -> its lineage (ProvenanceRecord.lineage) at the time of this run.",
    )
    outputs: tuple[str, ...] = Field(default=(), description="Arrays this stage wrote.")
    code_version: str
    started_at: datetime
    finished_at: datetime
    metrics: dict[str, float | int | str | bool | None] = Field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return (self.finished_at - self.started_at).total_seconds()

    def lineage(self) -> str:
        """16 hex digits that change when this stage's config or anything upstream of it changes (its own config
        hash and its inputs' lineages): what a downstream stage records as its input."""
        canonical = json.dumps([self.stage, self.config_hash, sorted(self.inputs.items())], separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]
