"""Writing DICOM-CT-PD views with pydicom (one file per view, geometry in the private tags) for the tests."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

SLOPE = 2e-4  # line integral per stored unit: 0 … 13.1 in uint16


def write_ctpd(
    folder: Path,
    line: np.ndarray,
    *,
    sid_mm: float,
    sdd_mm: float,
    pitch_mm: float,
    row_pitch_mm: float = 1.0,
    start_rad: float = 0.0,
    span_rad: float = 2 * math.pi,
    shape: str = "CYLINDRICAL",
    edit: Callable[[int, pydicom.Dataset], None] | None = None,
) -> list[Path]:
    """``line`` ``(views, rows, cols)`` as one file per view, stored like the public data sets (Rows = detector
    columns), under names in reverse angle order."""
    views, rows, cols = line.shape
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness"):
        delattr(base, tag)
    series, study = generate_uid(), generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(views):
        ds = copy.deepcopy(base)
        ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.SOPInstanceUID = series, study, generate_uid()
        ds.InstanceNumber = k + 1
        stored = np.round(line[k].T / SLOPE).clip(0, 65535).astype(np.uint16)  # (cols, rows)
        ds.Rows, ds.Columns = stored.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = stored.tobytes()
        ds.RescaleSlope, ds.RescaleIntercept = SLOPE, 0.0
        for group in (0x7029, 0x7031, 0x7033):
            ds.add_new((group, 0x0010), "LO", "DLX_PROJ")
        ds.add_new((0x7029, 0x1010), "US", rows)
        ds.add_new((0x7029, 0x1011), "US", cols)
        ds.add_new((0x7029, 0x1002), "FL", pitch_mm)
        ds.add_new((0x7029, 0x1006), "FL", row_pitch_mm * sdd_mm / sid_mm)
        ds.add_new((0x7029, 0x100B), "CS", shape)
        ds.add_new((0x7031, 0x1001), "FL", start_rad + k * span_rad / views)
        ds.add_new((0x7031, 0x1002), "FL", 0.0)
        ds.add_new((0x7031, 0x1003), "FL", sid_mm)
        ds.add_new((0x7031, 0x1031), "FL", sdd_mm)
        ds.add_new((0x7031, 0x1033), "FL", [(cols + 1) / 2.0, (rows + 1) / 2.0])
        ds.add_new((0x7033, 0x100B), "FL", 0.0)
        ds.add_new((0x7033, 0x100C), "FL", 0.0)
        ds.add_new((0x7033, 0x100D), "FL", 0.0)
        ds.add_new((0x7033, 0x100E), "CS", "FFSNONE")
        if span_rad >= 2 * math.pi - 1e-9:
            ds.add_new((0x7033, 0x1013), "US", views)
        if edit is not None:
            edit(k, ds)
        path = folder / f"view{views - 1 - k:05d}.dcm"
        ds.save_as(path)
        paths.append(path)
    return paths
