"""Ingest scanner output into a site store: validate, describe (ScanManifest), write Zarr; never modify the source.

Readers (:data:`READERS`, one table keyed by file suffix; the watcher and ``fedscan ingest --help`` list what it
accepts):

* ``npy`` / ``npz`` — a projection stack ``(views, rows, cols)`` or one sinogram ``(views, cols)``;
  NPY is memory-mapped and streamed; an NPZ member is read whole (zip members cannot be mapped).
* ``tiff`` — one multi-page TIFF, one page per view; a folder of TIFFs is a ``tiff-series``, one file per view.
* ``dicom`` — single-frame DICOM images (``.dcm``, ``.dicom``, Siemens ``.ima``, or no suffix with the DICOM
  preamble); a folder of them is a ``dicom-series``, one file is a one-slice series. Written as ``volume`` in HU
  via RescaleSlope/RescaleIntercept. Only geometry is read from headers (Rows, Columns, PixelSpacing,
  SliceThickness, InstanceNumber, ImagePositionPatient, rescale): no patient, study or institution attribute
  enters the store.

Identity: scan ids never come from file names, source files are recorded by position and checksum, and the names
go to the site's id map only (:mod:`tasks.identity`); labels must be in the site's allow-list and must not look
like identity.

Every source is checked in one streaming pass before anything is written (structure, NaN/inf, negative
counts, geometry agreement), so bad input leaves the store as it was. The write itself is resumable.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Any

import dask
import dask.array as da
import numpy as np
import numpy.typing as npt
import yaml
from pydantic import ValidationError

from schemas.geometry import Geometry, ReconGrid
from schemas.ids import check_chosen_scan_id
from schemas.ingest import GeometrySpec, IngestConfig, IngestSidecar
from schemas.manifest import DataKind, ScanManifest, SourceFile
from tasks.errors import AlreadyIngestedError, InvalidInputError
from tasks.identity import SiteIdentity
from tasks.physics import counts_to_line_integrals
from tasks.storage import SiteStore, StageOutput, StageResult, projection_chunks, volume_chunks

SIDECAR_NAMES = ("fedscan.yaml", "fedscan.yml")


# ------------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SourceStack:
    """A validated view of one source: shape ``(n, rows, cols)`` along its first axis, read in blocks."""

    path: Path
    reader: str
    shape: tuple[int, int, int]
    dtype: np.dtype[Any]
    files: tuple[Path, ...]
    read: Callable[[int, int], npt.NDArray[Any]]
    where: Callable[[int], str]
    extra: Mapping[str, Any] = field(default_factory=dict)


def _natural_key(path: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path.name)]


def _check_shape(path: Path, shape: tuple[int, ...], what: str) -> tuple[int, int, int]:
    if len(shape) == 2:
        shape = (shape[0], 1, shape[1])
    if len(shape) != 3:
        raise InvalidInputError(
            f"{path}: expected a {what} of 2 (views, cols) or 3 (views, rows, cols) dimensions, got shape {shape}"
        )
    if 0 in shape:
        raise InvalidInputError(f"{path}: {what} has a zero-size axis (shape {shape})")
    return (int(shape[0]), int(shape[1]), int(shape[2]))


def _check_dtype(path: Path, dtype: np.dtype[Any]) -> None:
    if dtype.kind not in "iuf":
        raise InvalidInputError(f"{path}: unsupported data type {dtype} (need integers or floats)")


def _open_npy(path: Path) -> SourceStack:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InvalidInputError(f"{path}: truncated or corrupt NPY file ({exc})") from exc
    _check_dtype(path, arr.dtype)
    shape = _check_shape(path, arr.shape, "projection stack")

    def read(a: int, b: int) -> npt.NDArray[Any]:
        block = np.load(path, mmap_mode="r", allow_pickle=False)[a:b]
        return np.asarray(block).reshape((b - a, *shape[1:]))

    return SourceStack(path, "npy", shape, arr.dtype, (path,), read, lambda i: f"{path.name} view {i}")


def _open_npz(path: Path, key: str | None) -> SourceStack:
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as npz:
            names = list(npz.files)
            if key is None:
                key = "projections" if "projections" in names else (names[0] if len(names) == 1 else None)
            if key is None or key not in names:
                raise InvalidInputError(
                    f"{path}: cannot tell which array holds the projections (members: {names}); "
                    "name it 'projections' or set npz_key in the sidecar"
                )
            arr = np.asarray(npz[key])
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise InvalidInputError(f"{path}: truncated or corrupt NPZ file ({exc})") from exc
    _check_dtype(path, arr.dtype)
    shape = _check_shape(path, arr.shape, "projection stack")
    arr = arr.reshape(shape)
    return SourceStack(
        path, "npz", shape, arr.dtype, (path,), lambda a, b: arr[a:b], lambda i: f"{path.name}[{key}] view {i}"
    )


def _tiff_error(path: Path, exc: Exception) -> InvalidInputError:
    return InvalidInputError(f"{path}: truncated or corrupt TIFF ({type(exc).__name__}: {exc})")


def _open_tiff(path: Path) -> SourceStack:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            n_pages = len(tif.pages)
            first = tif.pages.first
            page_shape = tuple(int(s) for s in first.shape)
            dtype = np.dtype(first.dtype)
    except Exception as exc:  # tifffile raises many types for damaged files
        raise _tiff_error(path, exc) from exc
    _check_dtype(path, dtype)
    if n_pages == 1:
        # One 2-D page is one sinogram (views, cols); a 3-D page is a whole stack.
        shape = _check_shape(path, page_shape, "TIFF image")
        single = True
    else:
        if len(page_shape) != 2:
            raise InvalidInputError(f"{path}: each page must be a 2-D projection (rows, cols), got {page_shape}")
        shape = _check_shape(path, (n_pages, *page_shape), "TIFF stack")
        single = False

    def read(a: int, b: int) -> npt.NDArray[Any]:
        try:
            if single:
                data = tifffile.imread(path)
                return np.asarray(data).reshape(shape)[a:b]
            data = tifffile.imread(path, key=range(a, b))
        except Exception as exc:
            raise _tiff_error(path, exc) from exc
        return np.asarray(data).reshape((b - a, *shape[1:]))

    return SourceStack(path, "tiff", shape, dtype, (path,), read, lambda i: f"{path.name} page {i}")


def _open_tiff_series(folder: Path, files: list[Path]) -> SourceStack:
    import tifffile

    shapes: dict[tuple[int, ...], list[str]] = {}
    dtypes = set()
    for f in files:
        try:
            with tifffile.TiffFile(f) as tif:
                page = tif.pages.first
                shapes.setdefault(tuple(int(s) for s in page.shape), []).append(f.name)
                dtypes.add(np.dtype(page.dtype))
        except Exception as exc:
            raise _tiff_error(f, exc) from exc
    if len(shapes) > 1:
        summary = "; ".join(f"{s}: {', '.join(n[:3])}{'…' if len(n) > 3 else ''}" for s, n in shapes.items())
        raise InvalidInputError(f"{folder}: TIFF views have different sizes ({summary})")
    if len(dtypes) > 1:
        raise InvalidInputError(f"{folder}: TIFF views have different data types {sorted(map(str, dtypes))}")
    (page_shape,) = shapes
    dtype = dtypes.pop()
    _check_dtype(folder, dtype)
    if len(page_shape) == 1:
        page_shape = (1, page_shape[0])
    if len(page_shape) != 2:
        raise InvalidInputError(f"{folder}: each TIFF must be one 2-D view (rows, cols), got {page_shape}")
    shape = _check_shape(folder, (len(files), *page_shape), "TIFF series")

    def read(a: int, b: int) -> npt.NDArray[Any]:
        out = np.empty((b - a, *shape[1:]), dtype=dtype)
        for i in range(a, b):
            try:
                out[i - a] = np.asarray(tifffile.imread(files[i])).reshape(shape[1:])
            except Exception as exc:
                raise _tiff_error(files[i], exc) from exc
        return out

    return SourceStack(folder, "tiff-series", shape, dtype, tuple(files), read, lambda i: files[i].name)


def _open_dicom_series(folder: Path, files: list[Path]) -> SourceStack:
    import pydicom
    from pydicom.errors import InvalidDicomError

    headers = []
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            raise InvalidInputError(f"{f}: not a readable DICOM file ({exc})") from exc
        if "Rows" not in ds or "Columns" not in ds:
            raise InvalidInputError(f"{f}: DICOM file holds no image (no Rows/Columns)")
        if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
            raise InvalidInputError(f"{f}: multi-frame DICOM is not supported; export single-frame slices")
        headers.append((f, ds))
    sizes: dict[tuple[int, int], list[str]] = {}
    for f, ds in headers:
        sizes.setdefault((int(ds.Rows), int(ds.Columns)), []).append(f.name)
    if len(sizes) > 1:
        summary = "; ".join(f"{r}x{c}: {', '.join(n[:3])}{'…' if len(n) > 3 else ''}" for (r, c), n in sizes.items())
        raise InvalidInputError(f"{folder}: DICOM series mixes image sizes ({summary})")
    numbers: dict[int, str] = {}
    for f, ds in headers:
        if "InstanceNumber" not in ds or ds.InstanceNumber in (None, ""):
            raise InvalidInputError(f"{f}: DICOM slice has no InstanceNumber; cannot order the series")
        n = int(ds.InstanceNumber)
        if n in numbers:
            raise InvalidInputError(f"{folder}: duplicated InstanceNumber {n} ({numbers[n]} and {f.name})")
        numbers[n] = f.name
    ordered = sorted(headers, key=lambda h: int(h[1].InstanceNumber))
    inst = [int(ds.InstanceNumber) for _, ds in ordered]
    gaps = sorted(set(range(inst[0], inst[-1] + 1)) - set(inst))
    if gaps:
        shown = ", ".join(map(str, gaps[:10])) + ("…" if len(gaps) > 10 else "")
        raise InvalidInputError(f"{folder}: DICOM series is missing slices (InstanceNumber {shown})")
    positions = [float(ds.ImagePositionPatient[2]) if "ImagePositionPatient" in ds else math.nan for _, ds in ordered]
    if len(positions) > 2 and not any(math.isnan(p) for p in positions):
        steps = np.abs(np.diff(positions))
        median = float(np.median(steps))
        if median == 0 or np.any(steps > 1.5 * median) or np.any(steps < 0.5 * median):
            i = int(np.argmax(np.abs(steps - median)))
            raise InvalidInputError(
                f"{folder}: irregular slice positions (step {steps[i]:.3g} mm between "
                f"{ordered[i][0].name} and {ordered[i + 1][0].name}, typical {median:.3g} mm): missing slices?"
            )
    ds0 = ordered[0][1]
    rows, cols = int(ds0.Rows), int(ds0.Columns)
    spacing = [float(v) for v in getattr(ds0, "PixelSpacing", [1.0, 1.0])]
    if not math.isclose(spacing[0], spacing[1], rel_tol=0.01):
        raise InvalidInputError(f"{ordered[0][0]}: non-square pixels {spacing} mm are not supported")
    thickness = float(getattr(ds0, "SliceThickness", 0) or 0) or None
    ordered_files = [f for f, _ in ordered]
    scales = [
        (float(getattr(ds, "RescaleSlope", 1) or 1), float(getattr(ds, "RescaleIntercept", 0) or 0))
        for _, ds in ordered
    ]

    def read(a: int, b: int) -> npt.NDArray[Any]:
        out = np.empty((b - a, rows, cols), dtype=np.float32)
        for i in range(a, b):
            try:
                pixels = pydicom.dcmread(ordered_files[i]).pixel_array
            except Exception as exc:  # pydicom/pixel handlers raise many types on damaged data
                raise InvalidInputError(
                    f"{ordered_files[i]}: cannot decode DICOM pixel data ({type(exc).__name__}: {exc})"
                ) from exc
            if pixels.shape != (rows, cols):
                raise InvalidInputError(
                    f"{ordered_files[i]}: pixel data of shape {pixels.shape}, header says {rows}x{cols}"
                )
            slope, intercept = scales[i]
            out[i - a] = pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)
        return out

    grid = ReconGrid(nx_pixels=cols, ny_pixels=rows, pixel_size_mm=spacing[0])
    return SourceStack(
        folder,
        "dicom-series",
        (len(ordered_files), rows, cols),
        np.dtype(np.float32),
        tuple(ordered_files),
        read,
        lambda i: ordered_files[i].name,
        extra={"grid": grid, "slice_thickness_mm": thickness},
    )


def _looks_like_dicom(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


# ------------------------------------------------------------------------------------------------
# The reader registry
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Reader:
    """One source format: how to open one file of it and, where it has one, a folder of such files."""

    name: str
    description: str
    open_file: Callable[[Path, str | None], SourceStack]
    open_folder: Callable[[Path, list[Path]], SourceStack] | None = None
    needs_sidecar: bool = True  # False: the files describe their own geometry (DICOM)


_NPY = Reader("npy", "NumPy array", lambda p, _key: _open_npy(p))
_NPZ = Reader("npz", "NumPy archive ('projections' member or npz_key)", _open_npz)
_TIFF = Reader(
    "tiff", "TIFF: multi-page stack, or a folder of one view per file", lambda p, _k: _open_tiff(p), _open_tiff_series
)
_DICOM = Reader(
    "dicom",
    "single-frame DICOM image(s): a folder is one series",
    lambda p, _key: _open_dicom_series(p.parent, [p]),
    _open_dicom_series,
    needs_sidecar=False,
)

#: Every accepted file suffix and its reader. A file without a suffix is DICOM when it has the DICOM preamble.
READERS: Mapping[str, Reader] = MappingProxyType(
    {
        ".npy": _NPY,
        ".npz": _NPZ,
        ".tif": _TIFF,
        ".tiff": _TIFF,
        ".dcm": _DICOM,
        ".dicom": _DICOM,
        ".ima": _DICOM,  # Siemens: DICOM Part 10 under another suffix
    }
)


def accepted_suffixes() -> tuple[str, ...]:
    """The file suffixes fedscan ingests (from :data:`READERS`)."""
    return tuple(READERS)


def describe_readers() -> str:
    """One line per reader, e.g. for help text: ``.npy: NumPy array; …``."""
    by_reader: dict[str, list[str]] = {}
    for suffix, reader in READERS.items():
        by_reader.setdefault(reader.description, []).append(suffix)
    return "; ".join(f"{'/'.join(sfx)}: {desc}" for desc, sfx in by_reader.items())


def reader_for(path: Path) -> Reader | None:
    """The reader of one file: by suffix, else DICOM when the file starts like DICOM."""
    if path.name.upper() == "DICOMDIR":
        return None
    reader = READERS.get(path.suffix.lower())
    if reader is None and _looks_like_dicom(path):
        return _DICOM
    return reader


def open_source(path: str | Path, *, npz_key: str | None = None) -> SourceStack:
    """Recognise and open a source (file or folder), checking its structure but not yet its values."""
    p = Path(path)
    if not p.exists():
        raise InvalidInputError(f"{p}: no such file or folder")
    if p.is_file():
        reader = reader_for(p)
        if reader is None:
            raise InvalidInputError(
                f"{p}: unknown file type {p.suffix.lower()!r} (expected {', '.join(accepted_suffixes())} or DICOM)"
            )
        return reader.open_file(p, npz_key)
    files = sorted((f for f in p.iterdir() if f.is_file() and not f.name.startswith(".")), key=_natural_key)
    groups: dict[str, tuple[Reader, list[Path]]] = {}
    for f in files:
        if f.name in SIDECAR_NAMES or f.suffix.lower() in (".yaml", ".yml"):
            continue
        reader = reader_for(f)
        if reader is not None and reader.open_folder is not None:
            groups.setdefault(reader.name, (reader, []))[1].append(f)
    if len(groups) > 1:
        kinds = " and ".join(name.upper() for name in groups)
        raise InvalidInputError(f"{p}: folder mixes {kinds} files; ingest one kind per folder")
    if not groups:
        kinds = " or ".join(r.name.upper() for r in dict.fromkeys(READERS.values()) if r.open_folder is not None)
        raise InvalidInputError(f"{p}: folder holds no {kinds} files")
    ((reader, members),) = groups.values()
    assert reader.open_folder is not None
    return reader.open_folder(p, members)


# ------------------------------------------------------------------------------------------------
# Checks
# ------------------------------------------------------------------------------------------------
def iter_blocks(stack: SourceStack, views_per_block: int) -> Iterator[tuple[int, npt.NDArray[Any]]]:
    n = stack.shape[0]
    for a in range(0, n, views_per_block):
        yield a, stack.read(a, min(n, a + views_per_block))


def validate_values(stack: SourceStack, data_kind: DataKind, *, views_per_block: int = 32) -> dict[str, float]:
    """Stream the source once: refuse NaN/inf and negative counts (naming where), return value stats."""
    lo, hi, total, count = math.inf, -math.inf, 0.0, 0
    for a, block in iter_blocks(stack, views_per_block):
        if block.dtype.kind == "f":
            bad = ~np.isfinite(block)
            if bad.any():
                i, r, c = (int(v) for v in np.argwhere(bad)[0])
                raise InvalidInputError(
                    f"{stack.path}: non-finite value ({block[i, r, c]}) at {stack.where(a + i)}, row {r}, col {c}"
                )
        if data_kind is DataKind.COUNTS and block.min() < 0:
            i, r, c = (int(v) for v in np.argwhere(block < 0)[0])
            raise InvalidInputError(
                f"{stack.path}: negative counts ({block[i, r, c]}) at {stack.where(a + i)}, row {r}, col {c}"
            )
        lo, hi = min(lo, float(block.min())), max(hi, float(block.max()))
        total += float(block.sum(dtype=np.float64))
        count += block.size
    return {"min": lo, "max": hi, "mean": total / max(count, 1)}


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checksum_sources(stack: SourceStack) -> tuple[tuple[SourceFile, ...], str, tuple[str, ...]]:
    """Per-file sha256 and size, one digest over (name, digest) of all files (the idempotency key), and the
    files' own names.

    The records name each file by its position and format suffix (``file-00000.npy``): a file's own name may
    carry identity, so it is returned separately, for the site's id map only.
    """
    base = stack.path if stack.path.is_dir() else stack.path.parent
    records, names = [], []
    combined = hashlib.sha256()
    for i, f in enumerate(stack.files):
        digest = _sha256_file(f)
        name = str(f.relative_to(base)) if f.is_relative_to(base) else f.name
        suffix = f.suffix.lower() if f.suffix.lower() in READERS else ""
        records.append(SourceFile(name=f"file-{i:05d}{suffix}", sha256=digest, size_bytes=f.stat().st_size))
        names.append(name)
        combined.update(f"{name}\0{digest}\n".encode())
    return tuple(records), combined.hexdigest(), tuple(names)


# ------------------------------------------------------------------------------------------------
# Sidecars and geometry
# ------------------------------------------------------------------------------------------------
def _first_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def find_sidecar(path: Path) -> Path | None:
    """``<source>.yaml`` beside a file, or ``fedscan.yaml`` inside a folder / beside a file."""
    candidates = [path.with_name(path.name + ".yaml"), path.with_suffix(".yaml")]
    candidates += [path / n for n in SIDECAR_NAMES] if path.is_dir() else [path.parent / n for n in SIDECAR_NAMES]
    return next((c for c in candidates if c.is_file()), None)


def load_sidecar(path: Path) -> IngestSidecar:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidInputError(f"{path}: cannot read the YAML sidecar ({exc})") from exc
    if not isinstance(raw, dict):
        raise InvalidInputError(f"{path}: the sidecar must be a YAML mapping")
    try:
        return IngestSidecar.model_validate(raw)
    except ValidationError as exc:
        raise InvalidInputError(f"{path}: invalid sidecar: {_first_error(exc)}") from exc


def resolve_geometry(spec: GeometrySpec, shape: tuple[int, int, int], *, where: str) -> Geometry:
    """Complete a site's geometry with the sizes of the data; sizes given must match it."""
    views, rows, cols = shape
    for name, given, actual in (
        ("n_views", spec.n_views, views),
        ("n_detector_rows", spec.n_detector_rows, rows),
        ("n_detector_cols", spec.n_detector_cols, cols),
    ):
        if given is not None and given != actual:
            raise InvalidInputError(f"{where}: geometry says {name}={given} but the data has {actual}")
    fields = spec.model_dump(exclude={"n_views", "n_detector_rows", "n_detector_cols", "grid"})
    fields.update(n_views=views, n_detector_rows=rows, n_detector_cols=cols)
    grid = spec.grid
    if grid is None:
        magnification = 1.0
        if spec.source_to_isocenter_mm and spec.source_to_detector_mm:
            magnification = spec.source_to_detector_mm / spec.source_to_isocenter_mm
        grid = ReconGrid(nx_pixels=cols, ny_pixels=cols, pixel_size_mm=spec.detector_pitch_mm / magnification)
    try:
        return Geometry(**fields, grid=grid)
    except ValidationError as exc:
        raise InvalidInputError(f"{where}: impossible geometry: {_first_error(exc)}") from exc


# ------------------------------------------------------------------------------------------------
# Ingest
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IngestResult:
    scan_id: str
    site_id: str
    store: str
    arrays: tuple[str, ...]
    result: StageResult


def _as_dask(stack: SourceStack, block: int, dtype: np.dtype[Any]) -> da.Array:
    n, rows, cols = stack.shape
    parts = []
    for a in range(0, n, block):
        b = min(n, a + block)
        parts.append(
            da.from_delayed(dask.delayed(stack.read, pure=True)(a, b), shape=(b - a, rows, cols), dtype=stack.dtype)
        )
    return da.concatenate(parts, axis=0).astype(dtype)


def ingest(
    path: str | Path,
    *,
    site: SiteStore,
    sidecar: IngestSidecar | None = None,
    sidecar_path: str | Path | None = None,
    scan_id: str | None = None,
) -> IngestResult:
    """Validate one source and write it as a scan of ``site``.

    ``sidecar`` (already parsed, e.g. from CLI flags) wins over ``sidecar_path``, which wins over a
    sidecar found next to the source. Raises :class:`AlreadyIngestedError` when the same source
    (by checksum) is already a complete scan of this store.
    """
    src = Path(path)
    if scan_id is not None:
        check_chosen_scan_id(scan_id, error=InvalidInputError)
    if sidecar is None:
        found = Path(sidecar_path) if sidecar_path is not None else find_sidecar(src)
        sidecar = load_sidecar(found) if found is not None else IngestSidecar()
    if sidecar.scan_id is not None:
        check_chosen_scan_id(sidecar.scan_id, error=InvalidInputError)
    identity = SiteIdentity(site)
    identity.check_labels(sidecar.labels, where=str(src))
    stack = open_source(src, npz_key=sidecar.npz_key)
    files, source_sha, names = checksum_sources(stack)
    existing = site.find_source(source_sha)
    if existing is not None:
        raise AlreadyIngestedError(
            f"{src}: already ingested as scan {existing!r} of site {site.site_id!r} (same sha256); nothing written",
            scan_id=existing,
        )
    is_images = stack.reader == "dicom-series"
    data_kind = DataKind.HU_IMAGES if is_images else sidecar.data_kind
    if data_kind is DataKind.HU_IMAGES and not is_images:
        raise InvalidInputError(f"{src}: data_kind hu_images needs a DICOM series")
    if data_kind is DataKind.COUNTS and sidecar.i0_photons is None:
        raise InvalidInputError(f"{src}: raw counts need i0_photons (unattenuated photons per bin) in the sidecar")
    geometry = None
    if not is_images:
        geometry = resolve_geometry(sidecar.geometry or GeometrySpec(), stack.shape, where=str(src))
    stats = validate_values(stack, data_kind)
    sid = scan_id or sidecar.scan_id or identity.keyed_scan_id(source_sha)  # never from the file name
    try:
        manifest = ScanManifest(
            scan_id=sid,
            site_id=site.site_id,
            data_kind=data_kind,
            geometry=geometry,
            image_grid=stack.extra.get("grid"),
            slice_thickness_mm=stack.extra.get("slice_thickness_mm"),
            i0_photons=sidecar.i0_photons,
            water_attenuation_per_mm=sidecar.water_attenuation_per_mm,
            source_files=files,
            source_sha256=source_sha,
            acquisition_time=sidecar.acquisition_time,
            labels=sidecar.labels,
        )
    except ValidationError as exc:
        raise InvalidInputError(f"{src}: {_first_error(exc)}") from exc
    scan = site.create_scan(manifest)
    identity.record_source(sid, source=str(src), names=names)
    config = IngestConfig(source_sha256=source_sha, reader=stack.reader, data_kind=data_kind)
    if is_images:
        chunks = volume_chunks(stack.shape)
        vol = _as_dask(stack, chunks[0], np.dtype(np.float32))
        outputs = [StageOutput("volume", vol, ("slice", "y", "x"), chunks, {"units": "HU"})]
    else:
        chunks = projection_chunks(stack.shape)
        if data_kind is DataKind.COUNTS:
            assert sidecar.i0_photons is not None
            counts = _as_dask(stack, chunks[0], stack.dtype)
            i0, floor = sidecar.i0_photons, config.counts_floor
            line = da.map_blocks(
                partial(counts_to_line_integrals, i0_photons=i0, counts_floor=floor), counts, dtype=np.float32
            )
            outputs = [
                StageOutput("counts", counts, ("view", "row", "col"), chunks, {"units": "photons"}),
                StageOutput("projections", line, ("view", "row", "col"), chunks, {"units": "line integral"}),
            ]
        else:
            line = _as_dask(stack, chunks[0], np.dtype(np.float32))
            outputs = [StageOutput("projections", line, ("view", "row", "col"), chunks, {"units": "line integral"})]
    result = scan.run_stage(
        stage="ingest",
        config=config,
        outputs=outputs,
        metrics=lambda _scan, _seconds: {
            "source_min": stats["min"],
            "source_max": stats["max"],
            "source_mean": stats["mean"],
        },
    )
    return IngestResult(sid, site.site_id, site.uri, tuple(o.name for o in outputs), result)
