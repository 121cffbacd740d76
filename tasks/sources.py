"""Scanner output as sources: one reader per format in one registry (:data:`READERS`), opened and checked
for structure, read in blocks of views.

Readers (keyed by file suffix; the watcher and ``fedscan ingest --help`` list what the table accepts):

* ``npy`` / ``npz`` — a projection stack ``(views, rows, cols)`` or one sinogram ``(views, cols)``;
  NPY is memory-mapped and streamed; an NPZ member is read whole (zip members cannot be mapped).
* ``tiff`` — one multi-page TIFF, one page per view; a folder of TIFFs is a ``tiff-series``, one file per view.
* ``dicom`` — single-frame DICOM CT images (``.dcm``, ``.dicom``, Siemens ``.ima``, or no suffix with the DICOM
  preamble); a folder of them is a ``dicom-series``, one file a one-slice series, checked and ordered in space by
  :mod:`tasks.dicom`. Only geometry and rescale values are kept; patient, study and series attributes are
  compared (one of each per scan) and never copied or echoed. A folder whose files carry the DICOM-CT-PD detector
  tags is a ``dicom-ct-pd`` projection scan instead (one file per view, geometry from the private tags:
  :mod:`tasks.ctpd`).

Adding a format is one ``open`` function and one line per suffix in :data:`READERS`. This module imports no
Dask or Zarr, so the CLI and the watcher can list the formats cheaply.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from tasks.errors import InvalidInputError

if TYPE_CHECKING:
    from tasks.ctpd import ProjectionLayout
    from tasks.dicom import SeriesLayout

__all__ = [
    "READERS",
    "SIDECAR_NAMES",
    "Reader",
    "SourceStack",
    "accepted_suffixes",
    "describe_readers",
    "find_sidecar",
    "open_source",
    "reader_for",
]

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
    #: DICOM only: ``read`` for the single decoding pass (:mod:`tasks.ingest` writes while decoding): a file whose
    #: pixels do not decode comes back as NaN (never a decoded value: DICOM pixels are integers times a finite
    #: rescale), so the writer finds it after the last chunk and ``read`` names the file and the fault.
    read_marked: Callable[[int, int], npt.NDArray[Any]] | None = None


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
        path,
        "npz",
        shape,
        arr.dtype,
        (path,),
        lambda a, b: arr[a:b],
        lambda i: f"{path.name}[{key}] view {i}",
        extra={"npz_key": key},
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
    from tasks.ctpd import check_views, is_ctpd
    from tasks.dicom import check_series_headers, read_headers, values_unvalidated

    with values_unvalidated():
        headers = read_headers(folder, files)
        if is_ctpd(headers[0][1]):
            return _ctpd_stack(folder, check_views(folder, headers))
        layout = check_series_headers(folder, headers)
    return _image_stack(folder, layout)


def _block_reader(
    read_one: Callable[[int], npt.NDArray[np.float32]], rows: int, cols: int, *, marked: bool
) -> Callable[[int, int], npt.NDArray[Any]]:
    """``read(a, b)`` over files ``a..b-1``, one decoded at a time; ``marked``: a file that fails is NaN."""

    def read(a: int, b: int) -> npt.NDArray[Any]:
        out = np.empty((b - a, rows, cols), dtype=np.float32)
        for i in range(a, b):
            if not marked:
                out[i - a] = read_one(i)
                continue
            try:
                out[i - a] = read_one(i)
            except InvalidInputError:
                out[i - a] = np.nan
        return out

    return read


def _image_stack(folder: Path, layout: SeriesLayout) -> SourceStack:
    from functools import partial

    from tasks.dicom import read_slice_hu

    rows, cols = layout.rows, layout.cols
    read_one = partial(read_slice_hu, layout)

    return SourceStack(
        folder,
        "dicom-series",
        (len(layout.files), rows, cols),
        np.dtype(np.float32),
        layout.files,
        _block_reader(read_one, rows, cols, marked=False),
        lambda i: layout.files[i].name,
        extra={
            "grid": layout.grid,
            "slice_thickness_mm": layout.slice_thickness_mm,
            "slice_spacing_mm": layout.slice_spacing_mm,
        },
        read_marked=_block_reader(read_one, rows, cols, marked=True),
    )


def _ctpd_stack(folder: Path, layout: ProjectionLayout) -> SourceStack:
    from functools import partial

    from tasks.ctpd import read_view

    read_one = partial(read_view, layout)
    return SourceStack(
        folder,
        "dicom-ct-pd",
        (len(layout.files), layout.rows, layout.cols),
        np.dtype(np.float32),
        layout.files,
        _block_reader(read_one, layout.rows, layout.cols, marked=False),
        lambda i: layout.files[i].name,
        extra={"geometry": layout.geometry},
        read_marked=_block_reader(read_one, layout.rows, layout.cols, marked=True),
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


_NPY = Reader("npy", "NumPy array (views, rows, cols) or (views, cols)", lambda p, _key: _open_npy(p))
_NPZ = Reader("npz", "NumPy archive, member 'projections' or npz_key", _open_npz)
_TIFF = Reader(
    "tiff", "multi-page TIFF, or a folder of one TIFF per view", lambda p, _k: _open_tiff(p), _open_tiff_series
)
_DICOM = Reader(
    "dicom",
    "single-frame DICOM, or a folder of them as one series",
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


def find_sidecar(path: Path) -> Path | None:
    """``<source>.yaml`` beside a file, or ``fedscan.yaml`` inside a folder / beside a file."""
    candidates = [path.with_name(path.name + ".yaml"), path.with_suffix(".yaml")]
    candidates += [path / n for n in SIDECAR_NAMES] if path.is_dir() else [path.parent / n for n in SIDECAR_NAMES]
    return next((c for c in candidates if c.is_file()), None)
