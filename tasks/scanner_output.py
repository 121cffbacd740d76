"""Write a simulated scan the way a site's scanner or archive would hand it over: files plus a YAML sidecar.

Used by the demo (so the real ingest path runs on it) and by tests of ingest and of the folder watcher.
Formats: ``npy-counts`` (integer counts, as a detector's ADC gives them: rounded, clipped at 0),
``tiff`` (one multi-page float32 TIFF of line integrals), ``tiff-series`` (one integer-counts TIFF per view).
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

import numpy as np
import numpy.typing as npt
import tifffile
import yaml

from schemas.geometry import Geometry
from schemas.manifest import DataKind


class ScannerFormat(StrEnum):
    NPY_COUNTS = "npy-counts"
    TIFF = "tiff"
    TIFF_SERIES = "tiff-series"


def adc_counts(counts: npt.NDArray[np.floating], *, i0_photons: float) -> npt.NDArray[np.unsignedinteger]:
    """Counts as a detector's ADC reports them: rounded, clipped at 0, 16-bit unless the dose needs 32."""
    dtype = np.uint16 if i0_photons * 1.5 < np.iinfo(np.uint16).max else np.uint32
    return np.clip(np.rint(counts), 0, np.iinfo(dtype).max).astype(dtype)


def sidecar_dict(
    *,
    scan_id: str,
    geometry: Geometry,
    data_kind: DataKind,
    i0_photons: float | None,
    water_attenuation_per_mm: float,
    labels: dict[str, str | int | float | bool] | None = None,
) -> dict[str, object]:
    geo = geometry.model_dump(mode="json")
    if geo.get("source_to_isocenter_mm") is None:
        geo.pop("source_to_isocenter_mm", None)
        geo.pop("source_to_detector_mm", None)
    out: dict[str, object] = {
        "scan_id": scan_id,
        "data_kind": data_kind.value,
        "water_attenuation_per_mm": water_attenuation_per_mm,
        "geometry": geo,
        "labels": dict(labels or {}),
    }
    if i0_photons is not None:
        out["i0_photons"] = float(i0_photons)
    return out


def write_scanner_output(
    folder: Path,
    *,
    scan_id: str,
    geometry: Geometry,
    line_integrals: npt.NDArray[np.float32],
    counts: npt.NDArray[np.floating] | None,
    i0_photons: float,
    water_attenuation_per_mm: float,
    fmt: ScannerFormat,
    labels: dict[str, str | int | float | bool] | None = None,
) -> Path:
    """Write one scan under ``folder``; returns the path to hand to ``fedscan ingest``.

    The sidecar is written first and the data last (a watcher treats a scan as complete only when its
    data file is whole; see flows/watch).
    """
    folder.mkdir(parents=True, exist_ok=True)
    if fmt is not ScannerFormat.TIFF and counts is None:
        raise ValueError(f"format {fmt.value} needs raw counts")
    kind = DataKind.LINE_INTEGRALS if fmt is ScannerFormat.TIFF else DataKind.COUNTS
    meta = sidecar_dict(
        scan_id=scan_id,
        geometry=geometry,
        data_kind=kind,
        i0_photons=i0_photons,
        water_attenuation_per_mm=water_attenuation_per_mm,
        labels=labels,
    )
    if fmt is ScannerFormat.NPY_COUNTS:
        assert counts is not None
        target = folder / f"{scan_id}.npy"
        target.with_name(target.name + ".yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
        np.save(target, adc_counts(counts, i0_photons=i0_photons))
        return target
    if fmt is ScannerFormat.TIFF:
        target = folder / f"{scan_id}.tif"
        target.with_name(target.name + ".yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
        tifffile.imwrite(target, np.ascontiguousarray(line_integrals, dtype=np.float32))
        return target
    assert counts is not None
    target = folder / scan_id
    target.mkdir(exist_ok=True)
    (target / "fedscan.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    adc = adc_counts(counts, i0_photons=i0_photons)
    for v in range(adc.shape[0]):
        tifffile.imwrite(target / f"view_{v:05d}.tif", adc[v])
    return target
