"""DICOM CT image series (``hu_images``): checked from their headers, ordered in space, read slice by slice in HU.

What a folder must be to become one scan, each refusal one line naming the files and the attribute, never its
value (patient, study and series attributes are compared, never echoed or copied):

* one patient (PatientID, PatientName), one study (StudyInstanceUID), one series (SeriesInstanceUID);
* one orientation (ImageOrientationPatient), pixel spacing (PixelSpacing), slice thickness (SliceThickness),
  image size (Rows, Columns), one sample per pixel, single-frame, with PixelData;
* slices ordered by ImagePositionPatient projected on the slice normal (row × column direction cosines), not by
  InstanceNumber or file name; the slice spacing is the median step between positions, and a duplicate position
  or a step that differs from it by more than half (a missing slice) is refused;
* every transfer syntax must have a pixel decoder installed (here: native, deflated and RLE through pydicom, JPEG
  baseline and JPEG 2000 through Pillow, JPEG Lossless and JPEG-LS through pylibjpeg-libjpeg); one without (e.g.
  High-Throughput JPEG 2000) is refused before any pixel is read, naming the syntax.

Pixels become HU with each slice's own RescaleSlope/RescaleIntercept. Reading decodes one file at a time: a
block of slices is the most ever held in memory.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from schemas.geometry import ReconGrid
from tasks.errors import InvalidInputError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = ["SeriesLayout", "check_series", "read_headers", "read_slice_hu", "values_unvalidated"]

#: Direction cosines that differ by more than this are different orientations.
_ORIENTATION_TOL = 1e-4
#: Pixel spacings and slice thicknesses that differ by more than this fraction are different.
_SPACING_RTOL = 1e-3
#: Positions closer than this along the normal are the same slice position, mm.
_DUPLICATE_MM = 1e-3
#: A step between adjacent slices outside (1 ± this) × the median step is a gap or an irregularity.
_STEP_TOLERANCE = 0.5


@dataclass(frozen=True)
class SeriesLayout:
    """The checked series: files in spatial order and the geometry the headers agree on."""

    files: tuple[Path, ...]
    rows: int
    cols: int
    pixel_spacing_mm: float
    slice_thickness_mm: float | None
    slice_spacing_mm: float | None
    rescale: tuple[tuple[float, float], ...]  # (slope, intercept) per ordered slice

    @property
    def grid(self) -> ReconGrid:
        return ReconGrid(nx_pixels=self.cols, ny_pixels=self.rows, pixel_size_mm=self.pixel_spacing_mm)


def _shown(names: Sequence[str]) -> str:
    return ", ".join(names[:3]) + ("…" if len(names) > 3 else "")


@contextlib.contextmanager
def values_unvalidated() -> Iterator[None]:
    """pydicom warns *and logs* invalid header values verbatim (a PatientName, a UID): reading never validates
    values, so no header value reaches a log through pydicom."""
    from pydicom import config

    mode = config.settings.reading_validation_mode
    config.settings.reading_validation_mode = config.IGNORE
    try:
        yield
    finally:
        config.settings.reading_validation_mode = mode


def _read_header(path: Path) -> Dataset:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        # Large values (PixelData) are deferred: their presence is known without reading them.
        return pydicom.dcmread(path, defer_size=1024)
    except (InvalidDicomError, OSError, ValueError, EOFError, AttributeError, KeyError) as exc:
        raise InvalidInputError(f"{path}: not a readable DICOM file ({type(exc).__name__})") from exc


def _one_value(
    folder: Path,
    headers: Sequence[tuple[Path, Dataset]],
    what: str,
    key: Callable[[Dataset], Any],
    same: Callable[[Any, Any], bool] | None = None,
) -> None:
    """Refuse a folder whose files disagree on ``what``; the message names files, never the values."""
    groups: list[tuple[Any, list[str]]] = []
    for path, ds in headers:
        value = key(ds)
        for ref, names in groups:
            if same(ref, value) if same is not None else ref == value:
                names.append(path.name)
                break
        else:
            groups.append((value, [path.name]))
    if len(groups) > 1:
        parts = "; ".join(_shown(names) for _, names in groups)
        raise InvalidInputError(f"{folder}: folder mixes {len(groups)} different {what} ({parts}); one series per scan")


def _floats(ds: Dataset, name: str) -> tuple[float, ...] | None:
    raw = ds.get(name)
    if raw is None or raw == "":
        return None
    try:
        return tuple(float(v) for v in (raw if isinstance(raw, Sequence) and not isinstance(raw, str) else [raw]))
    except (TypeError, ValueError):
        return None


def _close(a: tuple[float, ...] | None, b: tuple[float, ...] | None, *, atol: float = 0.0, rtol: float = 0.0) -> bool:
    if a is None or b is None:
        return a is b
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=rtol, abs_tol=atol) for x, y in zip(a, b, strict=True))


def _check_transfer_syntax(path: Path, ds: Dataset) -> None:
    from pydicom.pixels import get_decoder

    uid = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if uid is None:
        raise InvalidInputError(f"{path}: DICOM file has no TransferSyntaxUID; cannot decode its pixels")
    try:
        decoder = get_decoder(uid)
    except NotImplementedError as exc:
        raise InvalidInputError(f"{path}: unsupported transfer syntax {uid.name} ({uid}): no pixel decoder") from exc
    if not decoder.is_available:
        needs = "; ".join(decoder.missing_dependencies)
        raise InvalidInputError(
            f"{path}: transfer syntax {uid.name} ({uid}) has no pixel decoder installed here"
            + (f" ({needs})" if needs else "")
        )


def _check_image(path: Path, ds: Dataset) -> None:
    if "Rows" not in ds or "Columns" not in ds:
        raise InvalidInputError(f"{path}: DICOM file holds no image (no Rows/Columns)")
    if "PixelData" not in ds:
        raise InvalidInputError(f"{path}: DICOM file has no PixelData")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise InvalidInputError(f"{path}: multi-frame DICOM is not supported; export single-frame slices")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise InvalidInputError(f"{path}: colour DICOM (SamplesPerPixel > 1) is not a CT image")


def _order(folder: Path, headers: list[tuple[Path, Dataset]]) -> tuple[list[tuple[Path, Dataset]], float | None]:
    """Sort by position along the slice normal; return the ordered headers and the slice spacing (mm)."""
    if len(headers) == 1:
        return headers, None
    coords = []
    for path, ds in headers:
        orient, pos = _floats(ds, "ImageOrientationPatient"), _floats(ds, "ImagePositionPatient")
        if orient is None or len(orient) != 6:
            raise InvalidInputError(f"{path}: no ImageOrientationPatient; cannot order the slices in space")
        if pos is None or len(pos) != 3:
            raise InvalidInputError(f"{path}: no ImagePositionPatient; cannot order the slices in space")
        normal = np.cross(np.asarray(orient[:3]), np.asarray(orient[3:]))
        length = float(np.linalg.norm(normal))
        if not length > 0.5:  # direction cosines are unit vectors; a degenerate normal means no orientation
            raise InvalidInputError(f"{path}: ImageOrientationPatient is not two orthogonal unit vectors")
        normal /= length  # headers round direction cosines to a few digits
        coords.append(float(np.dot(normal, np.asarray(pos))))
    order = np.argsort(coords, kind="stable")
    ordered = [headers[i] for i in order]
    z = np.asarray(coords)[order]
    steps = np.diff(z)
    dup = np.flatnonzero(steps < _DUPLICATE_MM)
    if dup.size:
        i = int(dup[0])
        raise InvalidInputError(
            f"{folder}: duplicate slice position ({ordered[i][0].name} and {ordered[i + 1][0].name} "
            "lie at the same ImagePositionPatient)"
        )
    median = float(np.median(steps))
    off = np.flatnonzero(np.abs(steps - median) > _STEP_TOLERANCE * median)
    if off.size:
        i = int(off[np.argmax(np.abs(steps[off] - median))])
        why = "a slice is missing" if steps[i] > median else "irregular spacing"
        raise InvalidInputError(
            f"{folder}: {why} between {ordered[i][0].name} and {ordered[i + 1][0].name} "
            f"(step {steps[i]:.3g} mm, typical {median:.3g} mm along the slice normal)"
        )
    return ordered, median


def read_headers(folder: Path, files: Sequence[Path]) -> list[tuple[Path, Dataset]]:
    """Headers of a folder's DICOM files, checked for what every scan needs: an image with pixel data, one
    patient, study and series, and a decoder for each transfer syntax. Call inside :func:`values_unvalidated`."""
    headers = [(f, _read_header(f)) for f in files]
    for f, ds in headers:
        _check_image(f, ds)
    # The broadest disagreement first: two patients are also two studies and two series.
    _one_value(
        folder, headers, "patients (PatientID/PatientName)", lambda d: (d.get("PatientID"), d.get("PatientName"))
    )
    _one_value(folder, headers, "studies (StudyInstanceUID)", lambda d: d.get("StudyInstanceUID"))
    _one_value(folder, headers, "series (SeriesInstanceUID)", lambda d: d.get("SeriesInstanceUID"))
    for f, ds in headers:
        _check_transfer_syntax(f, ds)
    return headers


def check_series(folder: Path, files: Sequence[Path]) -> SeriesLayout:
    """Read the headers of a folder's DICOM files and check that they are one CT series (see the module doc).

    Raises
    ------
    InvalidInputError
        One line naming the folder or file and the attribute that disagrees (never its value).
    """
    with values_unvalidated():
        return check_series_headers(folder, read_headers(folder, files))


def check_series_headers(folder: Path, headers: list[tuple[Path, Dataset]]) -> SeriesLayout:
    """:func:`check_series` on headers already read by :func:`read_headers`."""
    _one_value(
        folder,
        headers,
        "orientations (ImageOrientationPatient)",
        lambda d: _floats(d, "ImageOrientationPatient"),
        lambda a, b: _close(a, b, atol=_ORIENTATION_TOL),
    )
    _one_value(
        folder,
        headers,
        "pixel spacings (PixelSpacing)",
        lambda d: _floats(d, "PixelSpacing"),
        lambda a, b: _close(a, b, rtol=_SPACING_RTOL),
    )
    _one_value(
        folder,
        headers,
        "slice thicknesses (SliceThickness)",
        lambda d: _floats(d, "SliceThickness"),
        lambda a, b: _close(a, b, rtol=_SPACING_RTOL),
    )
    _one_value(folder, headers, "image sizes (Rows/Columns)", lambda d: (int(d.Rows), int(d.Columns)))
    ordered, spacing = _order(folder, headers)
    f0, ds0 = ordered[0]
    pixel = _floats(ds0, "PixelSpacing") or (1.0, 1.0)
    if len(pixel) != 2 or min(pixel) <= 0:
        raise InvalidInputError(f"{f0}: PixelSpacing must be two positive numbers")
    if not math.isclose(pixel[0], pixel[1], rel_tol=0.01):
        raise InvalidInputError(f"{f0}: non-square pixels (PixelSpacing rows ≠ columns) are not supported")
    thickness = (_floats(ds0, "SliceThickness") or (0.0,))[0]
    rescale = []
    for f, ds in ordered:
        slope, intercept = _floats(ds, "RescaleSlope"), _floats(ds, "RescaleIntercept")
        s, b = (slope[0] if slope else 1.0), (intercept[0] if intercept else 0.0)
        if not (math.isfinite(s) and math.isfinite(b)) or s == 0:
            raise InvalidInputError(f"{f}: RescaleSlope must be a non-zero number")
        rescale.append((s, b))
    return SeriesLayout(
        files=tuple(f for f, _ in ordered),
        rows=int(ds0.Rows),
        cols=int(ds0.Columns),
        pixel_spacing_mm=pixel[0],
        slice_thickness_mm=thickness if thickness > 0 else None,
        slice_spacing_mm=spacing,
        rescale=tuple(rescale),
    )


def decode_pixels(path: Path) -> npt.NDArray[Any]:
    """One DICOM file's pixel array, decoded alone, with header values unvalidated (pydicom would log them)."""
    import pydicom

    try:
        with warnings.catch_warnings(), values_unvalidated():
            # pydicom warns (and corrects) when a JPEG 2000 stream's signedness disagrees with the header.
            warnings.simplefilter("ignore", UserWarning)
            return np.asarray(pydicom.dcmread(path).pixel_array)
    except Exception as exc:  # pydicom and its pixel handlers raise many types on damaged data
        raise InvalidInputError(f"{path}: cannot decode DICOM pixel data ({type(exc).__name__})") from exc


def read_slice_hu(layout: SeriesLayout, index: int) -> npt.NDArray[np.float32]:
    """Slice ``index`` (in spatial order) in HU, ``(rows, cols)`` float32, decoded alone."""
    path = layout.files[index]
    pixels = decode_pixels(path)
    if pixels.shape != (layout.rows, layout.cols):
        raise InvalidInputError(f"{path}: pixel data of shape {pixels.shape}, header says {layout.rows}x{layout.cols}")
    slope, intercept = layout.rescale[index]
    return np.asarray(pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept), dtype=np.float32)
