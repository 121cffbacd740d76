"""Per-slice labels and lesion masks that a site supplies for its scans.

The labels file is CSV with the header ``scan_id,slice,label``: one row per slice of every scan it names,
``slice`` counted from 0 in the stored order (DICOM series: along the slice normal; projection scans: detector
rows), ``label`` 0 or 1 (1: the slice shows a lesion). Masks are optional: ``(slices, y, x)`` binary arrays as NPY,
or NIfTI (``.nii`` / ``.nii.gz``, read with nibabel as ``(x, y, slice)`` and transposed). A mask must agree with
its labels (label 1 exactly where the mask slice is non-empty).

Where the files come from:

* beside a scan at ingest: ``labels.csv`` (and ``masks.npy`` / ``masks.nii.gz``) inside a scan folder, or
  ``<source>.labels.csv`` (``<source>.masks.npy`` …) beside a file; ``scan_id`` may be left empty there;
* for a whole site after ingest: ``fedscan label SITE_STORE LABELS.csv [--masks FILE_OR_FOLDER]`` (a folder
  holds ``<scan_id>.npy`` / ``.nii`` / ``.nii.gz`` per scan).

Everything is validated against the scans before anything is written (a refused file leaves the store as it
was); each problem is one line naming the file and the row. Labels land in the scan's ``labels`` (uint8,
``(slice,)``) and ``lesion_masks`` (uint8, ``(slice, y, x)``) arrays, where the surrogate stage and the federated
reader find them, through a ``labels`` provenance record.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import numpy.typing as npt
from pydantic import Field

from schemas.base import StageConfig
from schemas.ids import IdKind, validate_id
from tasks.errors import InvalidInputError, StoreNotFoundError
from tasks.storage import ScanStore, SiteStore, StageOutput, StageResult

__all__ = [
    "LABELS_ARRAY",
    "LABELS_STAGE",
    "MASKS_ARRAY",
    "LabelsConfig",
    "ScanLabels",
    "attach_labels",
    "find_beside",
    "is_labelled",
    "labels_beside",
    "read_labels_csv",
    "read_mask",
    "require_labelled_sites",
    "scan_slices",
    "validate_scan_labels",
    "write_labels",
]

LABELS_STAGE = "labels"
LABELS_ARRAY = "labels"
MASKS_ARRAY = "lesion_masks"
_HEADER = ("scan_id", "slice", "label")
_MASK_SUFFIXES = (".npy", ".nii.gz", ".nii")
_log = logging.getLogger(__name__)


class LabelsConfig(StageConfig):
    """What the ``labels`` record says was attached (the digests make a re-attach of the same files a no-op)."""

    labels_sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="Digest of this scan's labels.")
    masks_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$", description="Digest of its masks.")


@dataclass(frozen=True)
class ScanLabels:
    """One scan's validated labels (and masks)."""

    scan_id: str
    labels: npt.NDArray[np.uint8]  # (slices,)
    masks: npt.NDArray[np.uint8] | None  # (slices, y, x)


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Row:
    line: int
    slice: int
    label: int


def _short(value: str) -> str:
    return repr(value if len(value) <= 12 else value[:12] + "…")


def read_labels_csv(path: Path, *, default_scan_id: str | None = None) -> dict[str, list[_Row]]:
    """Rows of a labels CSV by scan id, checked one by one (header, integer slice, binary label, scan id,
    no slice twice). ``default_scan_id`` fills an empty ``scan_id`` (a file beside one scan)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"{path}: cannot read the labels CSV ({type(exc).__name__})") from exc
    reader = csv.reader(text.splitlines())
    header = next(reader, None)
    if header is None or tuple(h.strip().lower() for h in header) != _HEADER:
        raise InvalidInputError(f"{path}: the header must be 'scan_id,slice,label'")
    table: dict[str, list[_Row]] = {}
    seen: dict[tuple[str, int], int] = {}
    for line, row in enumerate(reader, start=2):
        if not row or all(not c.strip() for c in row):
            continue
        where = f"{path}: row {line}"
        if len(row) != 3:
            raise InvalidInputError(f"{where}: expected 3 columns (scan_id, slice, label), got {len(row)}")
        scan_id, slice_text, label_text = (c.strip() for c in row)
        if not scan_id:
            if default_scan_id is None:
                raise InvalidInputError(f"{where}: scan_id is empty (only a labels file beside one scan may omit it)")
            scan_id = default_scan_id
        try:
            validate_id(IdKind.SCAN, scan_id, error=InvalidInputError)
        except InvalidInputError:
            raise InvalidInputError(f"{where}: scan_id is not a valid fedscan scan id") from None
        try:
            k = int(slice_text)
        except ValueError:
            raise InvalidInputError(f"{where}: slice {_short(slice_text)} is not a whole number") from None
        if k < 0:
            raise InvalidInputError(f"{where}: slice {k} is negative (slices count from 0)")
        if label_text not in ("0", "1"):
            raise InvalidInputError(f"{where}: label {_short(label_text)} is not binary (0 or 1)")
        if (scan_id, k) in seen:
            raise InvalidInputError(
                f"{where}: slice {k} of scan {scan_id!r} is labelled twice (also in row {seen[scan_id, k]})"
            )
        seen[scan_id, k] = line
        table.setdefault(scan_id, []).append(_Row(line, k, int(label_text)))
    if not table:
        raise InvalidInputError(f"{path}: no label rows")
    return table


def read_mask(path: Path) -> npt.NDArray[Any]:
    """A mask file as ``(slices, y, x)``: NPY as stored, NIfTI ``(x, y, slice)`` transposed."""
    name = path.name.lower()
    if not name.endswith((".npy", ".nii", ".nii.gz")):
        raise InvalidInputError(f"{path}: masks must be NPY or NIfTI (.nii, .nii.gz)")
    try:
        if name.endswith(".npy"):
            arr = np.load(path, allow_pickle=False)
        else:
            import nibabel as nib

            img: Any = nib.load(path)
            arr = np.asarray(img.dataobj)
            if arr.ndim == 3:
                arr = arr.transpose(2, 1, 0)
    except Exception as exc:  # numpy and nibabel raise many types for damaged files
        raise InvalidInputError(f"{path}: cannot read the mask ({type(exc).__name__})") from exc
    return np.asarray(arr)


def find_beside(source: Path) -> tuple[Path | None, Path | None]:
    """The labels CSV and mask file that came with a source (inside its folder, or beside the file)."""
    if source.is_dir():
        labels = [source / "labels.csv"]
        masks = [source / f"masks{s}" for s in _MASK_SUFFIXES]
    else:
        labels = [source.with_name(source.name + ".labels.csv")]
        masks = [source.with_name(f"{source.name}.masks{s}") for s in _MASK_SUFFIXES]
    found_labels = next((p for p in labels if p.is_file()), None)
    found_masks = next((p for p in masks if p.is_file()), None)
    if found_masks is not None and found_labels is None:
        raise InvalidInputError(f"{found_masks}: masks without a labels CSV ({labels[0].name})")
    return found_labels, found_masks


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------
def scan_slices(scan: ScanStore) -> tuple[int, tuple[int, int]]:
    """A scan's number of image slices and their ``(y, x)`` size."""
    if "volume" in scan.array_names():
        shape = scan.array("volume").shape
        return int(shape[0]), (int(shape[1]), int(shape[2]))
    m = scan.manifest
    grid = m.grid
    if m.geometry is None or grid is None:
        raise InvalidInputError(f"scan {scan.scan_id!r}: neither a volume nor a geometry says how many slices it has")
    return m.geometry.n_detector_rows, (grid.ny_pixels, grid.nx_pixels)


def validate_scan_labels(
    scan_id: str,
    rows: Sequence[_Row],
    *,
    n_slices: int,
    image_shape: tuple[int, int],
    mask: npt.NDArray[Any] | None,
    csv_path: Path,
    mask_path: Path | None,
) -> ScanLabels:
    """Labels of one scan checked against its slices: none missing, none extra, masks of its shape, binary, and
    in agreement with the labels."""
    labels = np.zeros(n_slices, dtype=np.uint8)
    have = np.zeros(n_slices, dtype=bool)
    for r in rows:
        if r.slice >= n_slices:
            raise InvalidInputError(
                f"{csv_path}: row {r.line}: scan {scan_id!r} has slices 0–{n_slices - 1}; slice {r.slice} does not "
                "exist (slices count from 0)"
            )
        labels[r.slice], have[r.slice] = r.label, True
    if not have.all():
        missing = np.flatnonzero(~have)
        shown = ", ".join(str(int(k)) for k in missing[:8]) + ("…" if missing.size > 8 else "")
        raise InvalidInputError(
            f"{csv_path}: scan {scan_id!r} has {n_slices} slices; slice {shown} has no row (every slice needs a label)"
        )
    masks = None
    if mask is not None:
        assert mask_path is not None
        expected = (n_slices, *image_shape)
        if tuple(mask.shape) != expected:
            raise InvalidInputError(
                f"{mask_path}: mask of shape {tuple(mask.shape)}, but scan {scan_id!r} is {expected}"
            )
        if mask.dtype.kind not in "biuf" or not np.isin(mask, (0, 1)).all():
            raise InvalidInputError(f"{mask_path}: mask values must be 0 or 1")
        masks = mask.astype(np.uint8)
        shows: npt.NDArray[np.bool_] = np.asarray(masks.reshape(n_slices, -1).any(axis=1))
        off = np.flatnonzero(shows != labels.astype(bool))
        if off.size:
            k = int(off[0])
            line = next(r.line for r in rows if r.slice == k)
            raise InvalidInputError(
                f"{csv_path}: row {line}: label {labels[k]} of slice {k} disagrees with its mask in {mask_path.name} "
                f"({'a lesion' if shows[k] else 'no lesion'}); misaligned?"
            )
    return ScanLabels(scan_id, labels, masks)


def _digest(arr: npt.NDArray[Any]) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes() + str(arr.shape).encode()).hexdigest()


def write_labels(scan: ScanStore, labelled: ScanLabels) -> StageResult:
    """Write ``labels`` (and ``lesion_masks``) of one scan and the ``labels`` record; the same labels again are a
    no-op, other labels replace them."""
    config = LabelsConfig(
        labels_sha256=_digest(labelled.labels),
        masks_sha256=None if labelled.masks is None else _digest(labelled.masks),
    )
    outputs = [
        StageOutput(
            LABELS_ARRAY, da.from_array(labelled.labels), ("slice",), None, {"meaning": "1: slice shows a lesion"}
        )
    ]
    if labelled.masks is not None:
        outputs.append(
            StageOutput(
                MASKS_ARRAY,
                da.from_array(labelled.masks, chunks=(1, *labelled.masks.shape[1:])),
                ("slice", "y", "x"),
                None,
                {"meaning": "1: lesion"},
            )
        )
    return scan.run_stage(
        stage=LABELS_STAGE,
        config=config,
        outputs=outputs,
        metrics=lambda _s, _t: {
            "slices": int(labelled.labels.size),
            "lesion_slices": int(labelled.labels.sum()),
            "masks": labelled.masks is not None,
        },
    )


def _masks_for(masks: Path | None, scan_ids: Sequence[str], csv_path: Path) -> dict[str, Path]:
    if masks is None:
        return {}
    if masks.is_dir():
        found = {}
        for sid in scan_ids:
            path = next((masks / f"{sid}{s}" for s in _MASK_SUFFIXES if (masks / f"{sid}{s}").is_file()), None)
            if path is None:
                raise InvalidInputError(f"{masks}: no mask for scan {sid!r} ({sid}.npy, .nii or .nii.gz)")
            found[sid] = path
        return found
    if not masks.is_file():
        raise InvalidInputError(f"{masks}: no such mask file or folder")
    if len(scan_ids) != 1:
        raise InvalidInputError(
            f"{masks}: one mask file for {len(scan_ids)} scans in {csv_path.name}; give a folder of <scan_id>.npy"
        )
    return {scan_ids[0]: masks}


def attach_labels(site: SiteStore, csv_path: Path, *, masks: Path | None = None) -> list[tuple[str, StageResult]]:
    """Validate a labels CSV (and masks) against the site's scans, then write them; nothing is written unless
    every scan it names passes."""
    table = read_labels_csv(csv_path)
    known = set(site.scan_ids())
    for sid, rows in table.items():
        if sid not in known:  # not echoed: a mistyped id may be anything
            raise InvalidInputError(f"{csv_path}: row {rows[0].line}: no such scan in site {site.site_id!r}")
    mask_files = _masks_for(masks, list(table), csv_path)
    checked = []
    for sid, rows in table.items():
        scan = site.scan(sid)
        n, shape = scan_slices(scan)
        mpath = mask_files.get(sid)
        mask = read_mask(mpath) if mpath is not None else None
        checked.append(
            (
                scan,
                validate_scan_labels(
                    sid, rows, n_slices=n, image_shape=shape, mask=mask, csv_path=csv_path, mask_path=mpath
                ),
            )
        )
    return [(scan.scan_id, write_labels(scan, labelled)) for scan, labelled in checked]


def labels_beside(source: Path, *, scan_id: str, n_slices: int, image_shape: tuple[int, int]) -> ScanLabels | None:
    """The validated labels (and masks) that came with a source being ingested, or ``None``."""
    csv_path, mask_path = find_beside(source)
    if csv_path is None:
        return None
    table = read_labels_csv(csv_path, default_scan_id=scan_id)
    others = [rows[0].line for sid, rows in table.items() if sid != scan_id]
    if others:
        raise InvalidInputError(
            f"{csv_path}: row {min(others)}: names another scan; a labels file beside a scan labels that scan only "
            "(leave scan_id empty)"
        )
    mask = read_mask(mask_path) if mask_path is not None else None
    return validate_scan_labels(
        scan_id,
        table[scan_id],
        n_slices=n_slices,
        image_shape=image_shape,
        mask=mask,
        csv_path=csv_path,
        mask_path=mask_path,
    )


# ------------------------------------------------------------------------------------------------
# Status
# ------------------------------------------------------------------------------------------------
def is_labelled(scan: ScanStore) -> tuple[bool, bool]:
    """(has labels, has masks): complete arrays of one label per slice (written by ``labels`` or a demo)."""
    names = scan.array_names()
    if LABELS_ARRAY not in names:
        return False, False
    try:
        n, _ = scan_slices(scan)
    except (InvalidInputError, StoreNotFoundError):
        return False, False
    ok = tuple(scan.array(LABELS_ARRAY).shape) == (n,)
    return ok, ok and MASKS_ARRAY in names


def require_labelled_sites(store_uris: Sequence[str]) -> Mapping[str, tuple[str, ...]]:
    """Per site id, its scans with labels; refuses (naming every site) when no site has one: federated training
    has nothing to learn from."""
    by_site: dict[str, tuple[str, ...]] = {}
    for uri in store_uris:
        site = SiteStore.open(uri, mode="r")
        by_site[site.site_id] = tuple(s.scan_id for s in site.scans() if is_labelled(s)[0])
    for site_id, scans in by_site.items():
        _log.info("site %s: %d labelled scans", site_id, len(scans))
    if not any(by_site.values()):
        raise InvalidInputError(
            f"no site has a labelled scan (sites: {', '.join(sorted(by_site)) or 'none'}); "
            "attach labels with `fedscan label SITE_STORE LABELS.csv`"
        )
    return by_site
