"""What a site knows about one scan, and what each stage records about its own run."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Self

from pydantic import AfterValidator, Field, model_validator

from schemas.base import FrozenModel
from schemas.geometry import Geometry, ReconGrid
from schemas.identity import identity_kind
from schemas.ids import ScanId, SiteId

Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="Hex sha256 digest.")]
LabelValue = str | int | float | bool

#: Label keys that could carry a patient identity: refused in every manifest, whatever a site allows.
#: Matched inside the key (``PatientName``, ``SocialSecurityNumber``, ``nhs_number``) ...
_IDENTIFYING_KEY = re.compile(
    r"(patient|name|birth|dob|mrn|address|phone|ssn|accession|physician|operator|social|security|nhs|subject"
    r"|person|mail|postcode|postal|zipcode|street|insurance|referring)",
    re.IGNORECASE,
)
#: ... or as a whole word of it (``pat_id``, ``PID``, ``subject_id``, ``zip``): ``id`` alone is refused too.
_IDENTIFYING_WORDS = frozenset({"id", "ids", "pid", "uid", "pat", "pt", "zip", "tel", "mob", "fax", "dob", "sin"})

#: The label keys a site may use without configuring more (``tasks.identity`` keeps a site's own additions).
DEFAULT_LABEL_KEYS = frozenset(
    {
        "protocol",
        "body_part",
        "anatomy",
        "kvp",
        "exposure_mas",
        "tube_current_ma",
        "contrast",
        "phase",
        "lesion",
        "n_lesions",
        "lesion_prevalence",
        "finding",
        "split",
        "source",
        "scanner_model",
        "manufacturer",
        "reconstruction_kernel",
        "phantom",
        "counts_floor_photons",
    }
)
#: A label value is a short code, not free text.
MAX_LABEL_CHARS = 64
#: Integer label values at or above this have six digits or more: the length of an ID number.
_ID_NUMBER_MIN = 100_000
_LABEL_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")


def _key_words(key: str) -> list[str]:
    """``SocialSecurityNumber`` -> social, security, number; ``pat_id`` -> pat, id."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", key)
    return [w.lower() for w in re.split(r"[\s_]+", spaced) if w]


def identifying_label_key(key: str) -> bool:
    """True when a label key names something that identifies a patient (refused whatever a site allows)."""
    return bool(_IDENTIFYING_KEY.search(key)) or any(w in _IDENTIFYING_WORDS for w in _key_words(key))


def label_value_problem(value: LabelValue) -> str | None:
    """Why a label value may carry identity ("looks like a date", ...), or ``None``; never quotes the value."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return "is an integer of six or more digits (an ID number?)" if abs(value) >= _ID_NUMBER_MIN else None
    if isinstance(value, float):
        return None
    if len(value) > MAX_LABEL_CHARS:
        return f"is longer than {MAX_LABEL_CHARS} characters (labels are short codes, not free text)"
    kind = identity_kind(value)
    return None if kind is None else f"looks like identity ({kind})"


def check_labels(labels: dict[str, LabelValue], *, allowed_keys: frozenset[str] | None = None) -> None:
    """Refuse identifying label keys, keys outside ``allowed_keys`` (when given) and identity-like values.

    Raises ``ValueError`` naming the key and the problem, never the value.
    """
    bad = sorted(k for k in labels if not _LABEL_KEY.fullmatch(k) or identifying_label_key(k))
    if bad:
        raise ValueError(f"labels must not identify a patient; refused keys: {bad}")
    if allowed_keys is not None:
        unknown = sorted(set(labels) - allowed_keys)
        if unknown:
            raise ValueError(
                f"label keys {unknown} are not in the site's allow-list ({', '.join(sorted(allowed_keys))}); "
                "a site adds keys with tasks.identity.allow_label_keys"
            )
    for key, value in labels.items():
        problem = label_value_problem(value)
        if problem is not None:
            raise ValueError(f"label value of key {key!r} {problem}")


def _checked_labels(labels: dict[str, LabelValue]) -> dict[str, LabelValue]:
    check_labels(labels)
    return labels


#: Labels as every schema holds them: keys and values screened (:func:`check_labels` without an allow-list).
Labels = Annotated[
    dict[str, LabelValue],
    AfterValidator(_checked_labels),
    Field(description="Short, non-identifying codes (protocol, body part, lesion, split, ...)."),
]

#: Linear attenuation of water near 70 keV, 1/mm (the usual effective energy of a 120 kVp beam).
WATER_ATTENUATION_PER_MM = 0.0192


class DataKind(StrEnum):
    """What the stored numbers are."""

    COUNTS = "counts"  # detected photons; line integrals follow as log(I0 / counts)
    LINE_INTEGRALS = "line_integrals"  # -log(I / I0), dimensionless
    HU_IMAGES = "hu_images"  # reconstructed images in Hounsfield units (sites without projections)


class SourceFile(FrozenModel):
    """One input file, identified by content, never modified by fedscan."""

    name: str = Field(
        min_length=1,
        description="Position and suffix (``file-00000.npy``), never the file's own name (that may carry identity; "
        "the site's id map keeps it).",
    )
    sha256: Sha256
    size_bytes: int = Field(ge=0, description="File size, bytes.")


class FlatDarkRecord(FrozenModel):
    """How raw projections were normalised on ingest: line integrals = −log((P − D) / (F − D)), with F and D the
    averaged flat (open beam) and dark (no beam) images."""

    n_flats: int = Field(ge=1, description="Flat-field images averaged.")
    n_darks: int = Field(ge=0, description="Dark-field images averaged (0: no dark current subtracted).")
    clamped_values: int = Field(
        ge=0, description="Projection values with P − D ≤ 0 (no signal), clamped to the floor before the log."
    )
    dead_pixels: int = Field(
        ge=0, description="Detector pixels with F − D ≤ 0 (no open-beam signal); their gain is the median gain."
    )
    floor_fraction: float = Field(
        gt=0, lt=1, description="P − D is clamped to this fraction of F − D (transmission floor)."
    )


class ScanManifest(FrozenModel):
    """One scan of one site. Holds no patient identity: ids are safe path components, labels are screened
    (:func:`check_labels`), source files are named by position, not by their names."""

    scan_id: ScanId
    site_id: SiteId
    modality: str = Field(default="CT", pattern=r"^[A-Z]{2,4}$", description="DICOM modality code.")
    data_kind: DataKind
    geometry: Geometry | None = Field(default=None, description="Acquisition geometry; required for projection data.")
    image_grid: ReconGrid | None = Field(
        default=None, description="Grid of stored images (hu_images); defaults to geometry.grid."
    )
    slice_thickness_mm: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    slice_spacing_mm: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="Distance between adjacent image slices along their normal (hu_images from positions), mm.",
    )
    flat_dark: FlatDarkRecord | None = Field(
        default=None, description="Set when ingest normalised raw projections with flat and dark fields."
    )
    i0_photons: float | None = Field(
        default=None, gt=0, allow_inf_nan=False, description="Unattenuated photons per detector bin per view."
    )
    water_attenuation_per_mm: float = Field(
        default=WATER_ATTENUATION_PER_MM, gt=0, lt=1, description="Water attenuation used for HU, 1/mm."
    )
    source_files: tuple[SourceFile, ...] = Field(default=(), description="Ingested files, by content.")
    source_sha256: Sha256 | None = Field(
        default=None,
        description="Digest over the source files' contents in data order (names excluded); the idempotency key.",
    )
    acquisition_time: datetime | None = None
    labels: Labels = Field(default_factory=dict)

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
