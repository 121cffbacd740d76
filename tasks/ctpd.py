"""DICOM-CT-PD projection data: one DICOM file per view, the geometry in private tags (Chen et al., Med. Phys.
42(12) 2015; the format of the public low-dose CT projection data sets).

What fedscan's geometry can express is read; the rest is refused naming the tag:

* fan beam, ``DetectorShape`` (7029,100B) ``CYLINDRICAL`` (curved, equi-angular) or ``FLAT``; ``SPHERICAL`` refused;
* ρ0 ``DetectorFocalCenterRadialDistance`` (7031,1003) = source to isocentre, d0 ``ConstantRadialDistance``
  (7031,1031) = source to detector, column pitch ``DetectorElementTransverseSpacing`` (7029,1002) at the detector,
  row pitch ``DetectorElementAxialSpacing`` (7029,1006) scaled to the isocentre, central ray from
  ``DetectorCentralElement`` (7031,1033, 1-based column);
* view angles ϕ0 ``DetectorFocalCenterAngularPosition`` (7031,1001, radians): evenly spaced, at most one turn;
  views are ordered by angle;
* one axial position: a helical scan (``DetectorFocalCenterAxialPosition`` (7031,1002) changing between views)
  is refused; the detector rows of an axial scan are treated as slices (each row its own fan);
* no flying focal spot: ``FlyingFocalSpotMode`` (7033,100E) other than ``FFSNONE``, or a non-zero source shift
  (7033,100B/100C/100D), is refused.

A tag that differs between views where it must be constant is refused naming the file and the tag. Each view's
image is ``(detector rows, detector columns)`` of line integrals after RescaleSlope/Intercept; an image stored
the other way round (as the public data sets do: Rows = detector columns) is transposed. Unverified against real
scanner data: the direction of ϕ0 is taken to be fedscan's view angle, so a reconstruction may be rotated or
mirrored relative to the scanner's own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from schemas.geometry import BeamKind, DetectorShape
from schemas.ingest import GeometrySpec
from tasks.errors import InvalidInputError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = ["CTPD_TAGS", "ProjectionLayout", "check_views", "is_ctpd", "read_view"]

#: The private tags fedscan reads: name -> (group, element).
CTPD_TAGS: dict[str, tuple[int, int]] = {
    "NumberofDetectorRows": (0x7029, 0x1010),
    "NumberofDetectorColumns": (0x7029, 0x1011),
    "DetectorElementTransverseSpacing": (0x7029, 0x1002),
    "DetectorElementAxialSpacing": (0x7029, 0x1006),
    "DetectorShape": (0x7029, 0x100B),
    "DetectorFocalCenterAngularPosition": (0x7031, 0x1001),
    "DetectorFocalCenterAxialPosition": (0x7031, 0x1002),
    "DetectorFocalCenterRadialDistance": (0x7031, 0x1003),
    "ConstantRadialDistance": (0x7031, 0x1031),
    "DetectorCentralElement": (0x7031, 0x1033),
    "SourceAngularPositionShift": (0x7033, 0x100B),
    "SourceAxialPositionShift": (0x7033, 0x100C),
    "SourceRadialDistanceShift": (0x7033, 0x100D),
    "FlyingFocalSpotMode": (0x7033, 0x100E),
    "NumberofSourceAngularSteps": (0x7033, 0x1013),
}
#: Tags every view must share.
_CONSTANT = (
    "NumberofDetectorRows",
    "NumberofDetectorColumns",
    "DetectorElementTransverseSpacing",
    "DetectorElementAxialSpacing",
    "DetectorShape",
    "DetectorFocalCenterRadialDistance",
    "ConstantRadialDistance",
    "DetectorCentralElement",
    "FlyingFocalSpotMode",
)
_REQUIRED = (*_CONSTANT[:7], "DetectorFocalCenterAngularPosition")
_TOL = 1e-4


def _tag(name: str) -> str:
    g, e = CTPD_TAGS[name]
    return f"{name} ({g:04X},{e:04X})"


def is_ctpd(ds: Dataset) -> bool:
    """True when a DICOM header carries the DICOM-CT-PD detector tags."""
    return CTPD_TAGS["NumberofDetectorRows"] in ds and CTPD_TAGS["NumberofDetectorColumns"] in ds


def _value(ds: Dataset, name: str) -> tuple[float, ...] | str | None:
    """A private tag's value: numbers as a tuple, code strings stripped; UN bytes decoded by the tag's type."""
    key = CTPD_TAGS[name]
    if key not in ds:
        return None
    raw: Any = ds[key].value
    if isinstance(raw, bytes):
        if name in ("DetectorShape", "FlyingFocalSpotMode"):
            return raw.decode("ascii", "replace").strip(" \x00")
        dtype = "<u2" if name.startswith("Numberof") else "<f4"
        return tuple(float(v) for v in np.frombuffer(raw, dtype=dtype))
    if isinstance(raw, str):
        return raw.strip()
    if isinstance(raw, Sequence):
        return tuple(float(v) for v in raw)
    return (float(raw),)


@dataclass(frozen=True)
class ProjectionLayout:
    """The checked views: files ordered by angle and the geometry the headers agree on."""

    files: tuple[Path, ...]
    rows: int
    cols: int
    transposed: bool  # the image is stored (columns, rows)
    rescale: tuple[tuple[float, float], ...]
    geometry: GeometrySpec


def _same(a: tuple[float, ...] | str | None, b: tuple[float, ...] | str | None) -> bool:
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(
            math.isclose(x, y, rel_tol=_TOL, abs_tol=_TOL) for x, y in zip(a, b, strict=True)
        )
    return a == b


def _num(v: tuple[float, ...] | str | None, where: str, name: str) -> float:
    if not isinstance(v, tuple) or not v:
        raise InvalidInputError(f"{where}: {_tag(name)} must be a number")
    return v[0]


def check_views(folder: Path, headers: Sequence[tuple[Path, Dataset]]) -> ProjectionLayout:
    """Check the DICOM-CT-PD headers of a folder's files (read by :func:`tasks.dicom.read_headers`) and derive the
    geometry (see the module doc)."""
    first_path, first = headers[0]
    values = [(p, {name: _value(ds, name) for name in CTPD_TAGS}) for p, ds in headers]
    for p, v in values:
        missing = [name for name in _REQUIRED if v[name] is None]
        if missing:
            raise InvalidInputError(f"{p}: DICOM-CT-PD view without {_tag(missing[0])}")
    ref = values[0][1]
    for p, v in values[1:]:
        for name in _CONSTANT:
            if not _same(v[name], ref[name]):
                raise InvalidInputError(
                    f"{p}: {_tag(name)} contradicts the other views (as in {first_path.name}); one scan per folder"
                )
    where = str(first_path)
    mode = ref["FlyingFocalSpotMode"]
    if mode not in (None, "FFSNONE"):
        raise InvalidInputError(
            f"{where}: {_tag('FlyingFocalSpotMode')} is {mode}: a flying focal spot is not supported"
        )
    for name in ("SourceAngularPositionShift", "SourceAxialPositionShift", "SourceRadialDistanceShift"):
        for p, v in values:
            shift = v[name]
            if isinstance(shift, tuple) and any(abs(s) > _TOL for s in shift):
                raise InvalidInputError(f"{p}: {_tag(name)} is not zero: a flying focal spot is not supported")
    z = [v["DetectorFocalCenterAxialPosition"] for _, v in values]
    zs = [s[0] for s in z if isinstance(s, tuple) and s]
    if zs and max(zs) - min(zs) > _TOL:
        raise InvalidInputError(
            f"{folder}: {_tag('DetectorFocalCenterAxialPosition')} changes between views: helical scans "
            "(pitch > 0) are not supported, only axial ones"
        )
    shape = ref["DetectorShape"]
    detector = {"CYLINDRICAL": DetectorShape.CURVED, "FLAT": DetectorShape.FLAT}.get(str(shape).upper())
    if detector is None:
        raise InvalidInputError(f"{where}: {_tag('DetectorShape')} {shape} is not supported (CYLINDRICAL or FLAT)")
    rows = int(_num(ref["NumberofDetectorRows"], where, "NumberofDetectorRows"))
    cols = int(_num(ref["NumberofDetectorColumns"], where, "NumberofDetectorColumns"))
    img = (int(first.Rows), int(first.Columns))
    if img == (rows, cols):
        transposed = False
    elif img == (cols, rows):
        transposed = True
    else:
        raise InvalidInputError(
            f"{where}: image of {img[0]}x{img[1]} pixels, but the tags say {rows} rows x {cols} columns"
        )
    for p, ds in headers:
        if (int(ds.Rows), int(ds.Columns)) != img:
            raise InvalidInputError(f"{p}: image size (Rows/Columns) contradicts the other views")
    sid = _num(ref["DetectorFocalCenterRadialDistance"], where, "DetectorFocalCenterRadialDistance")
    sdd = _num(ref["ConstantRadialDistance"], where, "ConstantRadialDistance")
    angles = np.asarray(
        [_num(v["DetectorFocalCenterAngularPosition"], str(p), "DetectorFocalCenterAngularPosition") for p, v in values]
    )
    order = np.argsort(angles, kind="stable")
    phi = angles[order]
    if len(phi) < 2:
        raise InvalidInputError(f"{folder}: one view is not a scan")
    steps = np.diff(phi)
    step = float(np.median(steps))
    if step <= 0 or np.any(np.abs(steps - step) > 1e-3 * step + 1e-6):
        i = int(np.argmax(np.abs(steps - step)))
        raise InvalidInputError(
            f"{headers[int(order[i + 1])][0]}: {_tag('DetectorFocalCenterAngularPosition')} is not evenly spaced "
            "with the other views (duplicate or missing view?)"
        )
    span = math.degrees(step) * len(phi)
    if span > 360.0 + 1e-3:
        raise InvalidInputError(f"{folder}: the views cover {span:.1f}°, more than one turn (helical or repeated scan)")
    per_turn = ref["NumberofSourceAngularSteps"]
    if isinstance(per_turn, tuple) and per_turn and not math.isclose(2 * math.pi / per_turn[0], step, rel_tol=1e-3):
        raise InvalidInputError(
            f"{where}: {_tag('NumberofSourceAngularSteps')} contradicts the angular step of the views"
        )
    central = ref["DetectorCentralElement"]
    offset = 0.0
    if isinstance(central, tuple) and central:
        offset = central[0] - (cols + 1) / 2.0
    row_pitch = _num(ref["DetectorElementAxialSpacing"], where, "DetectorElementAxialSpacing") * sid / sdd
    spec = GeometrySpec(
        beam=BeamKind.FAN,
        detector_shape=detector,
        n_views=len(phi),
        n_detector_cols=cols,
        n_detector_rows=rows,
        angular_range_deg=min(span, 360.0),
        start_angle_deg=math.degrees(float(phi[0])),
        detector_pitch_mm=_num(ref["DetectorElementTransverseSpacing"], where, "DetectorElementTransverseSpacing"),
        detector_row_pitch_mm=row_pitch,
        detector_offset_cols=offset,
        source_to_isocenter_mm=sid,
        source_to_detector_mm=sdd,
    )
    ordered = [headers[int(i)] for i in order]
    rescale = tuple(
        (float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)) for _, ds in ordered
    )
    return ProjectionLayout(tuple(p for p, _ in ordered), rows, cols, transposed, rescale, spec)


def read_view(layout: ProjectionLayout, index: int) -> npt.NDArray[np.float32]:
    """View ``index`` (in angle order) as ``(rows, cols)`` float32 line integrals, decoded alone."""
    from tasks.dicom import decode_pixels

    path = layout.files[index]
    pixels = decode_pixels(path)
    if layout.transposed:
        pixels = pixels.T
    if pixels.shape != (layout.rows, layout.cols):
        raise InvalidInputError(f"{path}: pixel data of shape {pixels.shape}, expected {layout.rows}x{layout.cols}")
    slope, intercept = layout.rescale[index]
    return np.asarray(pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept), dtype=np.float32)
