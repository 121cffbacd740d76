"""DICOM image series: real compressed CT slices from pydicom-data, ordered in space, checked header by header."""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import generate_uid

from tasks.errors import InvalidInputError
from tasks.ingest import ingest, open_source
from tasks.storage import SiteStore

IDENTITY = {
    "PatientName": "DOE^JANE",
    "PatientID": "MRN7654321",
    "PatientBirthDate": "19700101",
    "StudyDate": "20240317",
    "AccessionNumber": "ACC9081726",
    "InstitutionName": "Saint Elsewhere Hospital",
}


@pytest.fixture
def site(tmp_path) -> SiteStore:
    return SiteStore.create(tmp_path / "site-a.zarr", site_id="site-a")


def write_series(
    folder: Path,
    source: str,
    n: int,
    *,
    step_mm: float = 2.0,
    order: list[int] | None = None,
    identity: dict[str, str] | None = None,
    edit=None,
) -> list[Path]:
    """``n`` slices of one series from one real DICOM file, written under shuffled names (``order[k]`` is the
    file number of slice ``k``); slice ``k`` lies ``k * step_mm`` along the slice normal."""
    base = pydicom.dcmread(get_testdata_file(source))
    orient = np.asarray([float(v) for v in base.ImageOrientationPatient])
    normal = np.cross(orient[:3], orient[3:])
    origin = np.asarray([float(v) for v in base.ImagePositionPatient])
    series, study = generate_uid(), generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    order = order or list(range(n))
    paths = []
    for k in range(n):
        ds = copy.deepcopy(base)
        ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.SOPInstanceUID = series, study, generate_uid()
        ds.ImagePositionPatient = [float(v) for v in origin + k * step_mm * normal]
        ds.InstanceNumber = n - k  # reversed on purpose: the order comes from positions
        ds.RescaleIntercept = -1024 + 10 * k  # each slice's own rescale
        for attr, value in (identity or {}).items():
            setattr(ds, attr, value)
        if edit is not None:
            edit(k, ds)
        p = folder / f"IM{order[k]:04d}"  # no suffix: recognised by the DICM preamble
        ds.save_as(p)
        paths.append(p)
    return paths


def decoded_hu(path: Path) -> np.ndarray:
    ds = pydicom.dcmread(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the pixel-representation mismatch is corrected, with a warning
        pixels = ds.pixel_array
    return pixels.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def test_real_j2k_series_is_ordered_by_position_along_the_normal(tmp_path, site):
    # explicit_VR-UN.dcm: abdomen, 512², JPEG 2000 lossless, orientation [1,0,0, 0,-1,0] (normal -z)
    files = write_series(tmp_path / "abdomen", "explicit_VR-UN.dcm", 4, step_mm=2.5, order=[2, 0, 3, 1])
    assert pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"
    stack = open_source(tmp_path / "abdomen")
    assert stack.reader == "dicom-series" and stack.shape == (4, 512, 512)
    assert [f.name for f in stack.files] == ["IM0002", "IM0000", "IM0003", "IM0001"]  # not by name or number
    res = ingest(tmp_path / "abdomen", site=site)
    scan = site.scan(res.scan_id)
    vol = scan.array("volume")
    for k in range(4):
        np.testing.assert_allclose(vol[k], decoded_hu(files[k]), atol=1e-3)
    assert float(vol[1].mean() - vol[0].mean()) == pytest.approx(10.0, abs=1e-3)  # per-slice intercepts
    m = scan.manifest
    assert m.data_kind.value == "hu_images"
    assert m.slice_spacing_mm == pytest.approx(2.5)
    assert m.slice_thickness_mm is None  # this file states none
    assert m.grid.pixel_size_mm == pytest.approx(0.859375) and m.grid.nx_pixels == 512


def test_oblique_series_spacing_is_measured_along_its_normal(tmp_path, site):
    # J2K_pixelrep_mismatch.dcm: head, tilted orientation; its JPEG 2000 stream disagrees with PixelRepresentation
    files = write_series(tmp_path / "head", "J2K_pixelrep_mismatch.dcm", 3, step_mm=5.0)
    stack = open_source(tmp_path / "head")
    assert stack.files == tuple(files)
    assert stack.extra["slice_spacing_mm"] == pytest.approx(5.0, rel=1e-4)  # DS values carry ~5 digits
    assert stack.extra["slice_thickness_mm"] == pytest.approx(5.0)
    np.testing.assert_allclose(stack.read(2, 3)[0], decoded_hu(files[2]), atol=1e-3)


def _mixed(tmp_path: Path, attr: str, value: object) -> Path:
    folder = tmp_path / attr
    files = write_series(folder, "CT_small.dcm", 4, step_mm=5.0)
    ds = pydicom.dcmread(files[2])
    setattr(ds, attr, value)
    ds.save_as(files[2])
    return folder


@pytest.mark.parametrize(
    ("attr", "value", "what"),
    [
        ("PatientID", "MRN0000001", "patients (PatientID/PatientName)"),
        ("PatientName", "ROE^RICHARD", "patients (PatientID/PatientName)"),
        ("StudyInstanceUID", "1.2.826.0.1.3680043.8.498.1", "studies (StudyInstanceUID)"),
        ("SeriesInstanceUID", "1.2.826.0.1.3680043.8.498.2", "series (SeriesInstanceUID)"),
        ("ImageOrientationPatient", [1.0, 0.0, 0.0, 0.0, 0.8, -0.6], "orientations (ImageOrientationPatient)"),
        ("PixelSpacing", [0.7, 0.7], "pixel spacings (PixelSpacing)"),
        ("SliceThickness", 2.0, "slice thicknesses (SliceThickness)"),
    ],
)
def test_a_folder_that_mixes_is_refused_naming_the_attribute_not_its_value(tmp_path, site, attr, value, what):
    folder = _mixed(tmp_path, attr, value)
    with pytest.raises(InvalidInputError, match=r"folder mixes 2 different ") as info:
        ingest(folder, site=site)
    msg = str(info.value)
    assert what in msg and "IM0002" in msg and len(msg.splitlines()) == 1
    original = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for shown in (value, original.get(attr)):
        text = str(shown)
        if len(text) > 4:
            assert text not in msg
    assert "MRN" not in msg and "ROE" not in msg
    assert site.scan_ids() == []


def test_two_real_series_in_one_folder_are_refused(tmp_path, site):
    a = write_series(tmp_path / "a", "CT_small.dcm", 2, step_mm=5.0)
    b = write_series(tmp_path / "b", "CT_small.dcm", 2, step_mm=5.0)
    both = tmp_path / "both"
    both.mkdir()
    for k, f in enumerate([*a, *b]):
        shutil.copy(f, both / f"s{k}.dcm")
    with pytest.raises(InvalidInputError, match=r"both: folder mixes 2 different studies \(StudyInstanceUID\)"):
        ingest(both, site=site)


def test_missing_pixel_data_and_unsupported_transfer_syntax(tmp_path, site):
    files = write_series(tmp_path / "nopix", "CT_small.dcm", 3, step_mm=5.0)
    ds = pydicom.dcmread(files[1])
    del ds.PixelData
    ds.save_as(files[1])
    with pytest.raises(InvalidInputError, match=r"IM0001: DICOM file has no PixelData$"):
        ingest(tmp_path / "nopix", site=site)
    # a syntax whose decoder (pylibjpeg-openjpeg) is not installed: refused from the header, naming it
    htj2k = tmp_path / "htj2k"
    htj2k.mkdir()
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.file_meta.TransferSyntaxUID = pydicom.uid.HTJ2KLossless
    ds.PixelData = encapsulate([b"\xff\x4f" + bytes(64)])
    ds["PixelData"].VR = "OB"
    ds.save_as(htj2k / "slice.dcm")
    with pytest.raises(
        InvalidInputError, match=r"slice.dcm: transfer syntax High-Throughput JPEG 2000 .*4\.201"
    ) as info:
        ingest(htj2k, site=site)
    assert "no pixel decoder installed here" in str(info.value) and len(str(info.value).splitlines()) == 1
    assert site.scan_ids() == []


def test_a_real_jpeg_lossless_slice_is_decoded(tmp_path, site):
    # bad_sequence.dcm: a real neck slice, JPEG Lossless process 14 (pylibjpeg + pylibjpeg-libjpeg decode it)
    folder = tmp_path / "neck"
    folder.mkdir()
    shutil.copy(get_testdata_file("bad_sequence.dcm"), folder / "neck.dcm")
    scan = site.scan(ingest(folder, site=site).scan_id)
    np.testing.assert_allclose(scan.array("volume")[0], decoded_hu(folder / "neck.dcm"), atol=1e-3)
    assert float(scan.array("volume")[0].max()) > 500.0  # bone


def test_identifying_attributes_of_a_real_series_never_reach_the_store(tmp_path, site):
    write_series(tmp_path / "id", "explicit_VR-UN.dcm", 3, step_mm=1.0, identity=IDENTITY)
    res = ingest(tmp_path / "id", site=site)
    texts = [p.read_text() for p in Path(site.uri).rglob("zarr.json")]
    assert any(res.scan_id in t for t in texts)
    for text in texts:
        json.loads(text)
        for value in [*IDENTITY.values(), "DOE", "7654321", "Elsewhere", "2024-03-17"]:
            assert value not in text


def _store_files(site: SiteStore) -> dict[str, bytes]:
    """Every file of a local store but its lock files, with contents."""
    root = Path(site.uri)
    return {
        str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file() and ".locks" not in p.parts
    }


def test_each_slice_is_decoded_once_and_the_stats_come_from_the_written_volume(tmp_path, site, monkeypatch):
    import tasks.dicom

    files = write_series(tmp_path / "abd", "explicit_VR-UN.dcm", 4, step_mm=2.0)
    decoded: list[str] = []
    real = tasks.dicom.decode_pixels
    monkeypatch.setattr(tasks.dicom, "decode_pixels", lambda p: decoded.append(p.name) or real(p))
    res = ingest(tmp_path / "abd", site=site)
    assert sorted(decoded) == sorted(f.name for f in files)  # once each: no separate checking pass
    volume = np.asarray(site.scan(res.scan_id).array("volume")[...])
    metrics = res.result.record.metrics
    assert metrics["source_min"] == pytest.approx(float(volume.min()))
    assert metrics["source_max"] == pytest.approx(float(volume.max()))
    assert metrics["source_mean"] == pytest.approx(float(volume.mean(dtype=np.float64)), rel=1e-6)


def test_a_slice_whose_pixels_do_not_decode_rolls_the_scan_back(tmp_path, site):
    # a labelled real series first, so the store holds a scan and an id map that must stay as they are
    write_series(tmp_path / "kept", "CT_small.dcm", 3, step_mm=5.0)
    kept = ingest(tmp_path / "kept", site=site).scan_id
    before = _store_files(site)
    files = write_series(tmp_path / "bad", "explicit_VR-UN.dcm", 5, step_mm=2.0)
    ds = pydicom.dcmread(files[3])
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(200)])  # a JPEG 2000 stream that is not one
    ds.save_as(files[3])
    with pytest.raises(InvalidInputError, match=r"IM0003: cannot decode DICOM pixel data") as info:
        ingest(tmp_path / "bad", site=site)
    assert len(str(info.value).splitlines()) == 1
    assert site.scan_ids() == [kept]
    assert _store_files(site) == before  # no chunk, group or id-map entry of the refused scan is left
    # the folder, mended, ingests as a new scan
    write_series(tmp_path / "good", "explicit_VR-UN.dcm", 5, step_mm=2.0)
    assert ingest(tmp_path / "good", site=site).scan_id != kept


def test_a_slice_that_failed_to_decode_once_is_refused_and_a_second_ingest_writes_it(tmp_path, site, monkeypatch):
    import tasks.dicom

    files = write_series(tmp_path / "abd", "CT_small.dcm", 4, step_mm=5.0)
    real, failed = tasks.dicom.decode_pixels, []

    def once(path):  # the first decode of one file fails (a read error that passes), every other succeeds
        if path == files[2] and not failed:
            failed.append(path)
            raise InvalidInputError(f"{path}: cannot decode DICOM pixel data (OSError)")
        return real(path)

    monkeypatch.setattr(tasks.dicom, "decode_pixels", once)
    with pytest.raises(InvalidInputError, match=r"IM0002 did not decode while writing; ingest it again"):
        ingest(tmp_path / "abd", site=site)
    assert site.scan_ids() == []
    res = ingest(tmp_path / "abd", site=site)
    np.testing.assert_allclose(site.scan(res.scan_id).array("volume")[2], decoded_hu(files[2]), atol=1e-3)
