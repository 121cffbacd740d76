from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
import tifffile
import yaml
from pydicom.data import get_testdata_file

from schemas.ingest import GeometrySpec, IngestSidecar
from tasks.errors import AlreadyIngestedError, InvalidInputError
from tasks.ingest import ingest, open_source
from tasks.storage import SiteStore, missing_chunks

PARALLEL = {"geometry": {"beam": "parallel", "angular_range_deg": 180, "detector_pitch_mm": 1.0}}
FAN = {
    "geometry": {
        "beam": "fan",
        "detector_shape": "curved",
        "detector_pitch_mm": 1.0,
        "source_to_isocenter_mm": 500.0,
        "source_to_detector_mm": 900.0,
    }
}


@pytest.fixture
def site(tmp_path) -> SiteStore:
    return SiteStore.create(tmp_path / "site-a.zarr", site_id="site-a")


def write_sidecar(path: Path, content: dict) -> None:
    path.with_name(path.name + ".yaml").write_text(yaml.safe_dump(content))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def scan_groups(site: SiteStore) -> list[str]:
    return SiteStore.open(site.uri).scan_ids()


# ---- happy paths ------------------------------------------------------------------------------------
def test_npy_line_integrals_3d(tmp_path, site, rng):
    data = rng.random((40, 3, 24)).astype("f4")
    src = tmp_path / "scan1.npy"
    np.save(src, data)
    write_sidecar(src, {**PARALLEL, "labels": {"protocol": "abdomen"}})
    before = digest(src)
    res = ingest(src, site=site)
    scan = site.scan(res.scan_id)
    np.testing.assert_array_equal(scan.array("projections")[...], data)
    m = scan.manifest
    assert m.geometry.n_views == 40 and m.geometry.n_detector_rows == 3 and m.geometry.n_detector_cols == 24
    assert m.geometry.grid.nx_pixels == 24
    assert m.source_files[0].sha256 == before
    assert m.labels == {"protocol": "abdomen"}
    assert scan.is_done("ingest")
    assert tuple(scan.array("projections").metadata.dimension_names) == ("view", "row", "col")
    assert digest(src) == before  # the source is never modified


def test_npy_counts_written_with_line_integrals(tmp_path, site, rng):
    i0 = 1e4
    counts = rng.poisson(i0 * np.exp(-rng.random((20, 2, 16)))).astype("u2")
    counts[0, 0, 0] = 0  # a zero-count bin is clamped, not infinite
    src = tmp_path / "counts.npy"
    np.save(src, counts)
    sidecar = IngestSidecar(data_kind="counts", i0_photons=i0, geometry=GeometrySpec(**FAN["geometry"]))
    res = ingest(src, site=site, sidecar=sidecar)
    scan = site.scan(res.scan_id)
    np.testing.assert_array_equal(scan.array("counts")[...], counts)
    p = scan.array("projections")[...]
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p[1:], np.log(i0 / counts[1:].astype("f4")), rtol=1e-5)
    assert p[0, 0, 0] == pytest.approx(np.log(i0 / 0.5))
    assert scan.manifest.i0_photons == i0 and scan.manifest.geometry.magnification == pytest.approx(1.8)


def test_npy_2d_sinogram_and_npz(tmp_path, site, rng):
    sino = rng.random((30, 20)).astype("f4")
    src = tmp_path / "sino.npy"
    np.save(src, sino)
    res = ingest(src, site=site, sidecar=IngestSidecar(**PARALLEL))
    assert site.scan(res.scan_id).array("projections").shape == (30, 1, 20)
    npz = tmp_path / "stack.npz"
    np.savez_compressed(npz, projections=sino[:, None, :] + 1, angles=np.arange(30))
    res2 = ingest(npz, site=site, sidecar=IngestSidecar(**PARALLEL))
    np.testing.assert_array_equal(site.scan(res2.scan_id).array("projections")[...], sino[:, None, :] + 1)


def test_tiff_multipage_and_series(tmp_path, site, rng):
    data = (rng.random((12, 4, 10)) * 100).astype("f4")
    multi = tmp_path / "views.tif"
    tifffile.imwrite(multi, data)
    res = ingest(multi, site=site, sidecar=IngestSidecar(**PARALLEL))
    np.testing.assert_array_equal(site.scan(res.scan_id).array("projections")[...], data)
    folder = tmp_path / "series"
    folder.mkdir()
    for i in range(12):  # natural order: view_2 before view_10
        tifffile.imwrite(folder / f"view_{i}.tiff", data[i] + 1)
    (folder / "fedscan.yaml").write_text(yaml.safe_dump(PARALLEL))
    res2 = ingest(folder, site=site)
    np.testing.assert_array_equal(site.scan(res2.scan_id).array("projections")[...], data + 1)
    assert len(site.scan(res2.scan_id).manifest.source_files) == 12


def make_dicom_series(folder: Path, n: int = 5, *, numbers=None, positions=None, sizes=None) -> list[Path]:
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    folder.mkdir(parents=True, exist_ok=True)
    numbers = numbers or list(range(1, n + 1))
    positions = positions or [float(2.5 * k) for k in range(n)]
    paths = []
    for k, (num, z) in enumerate(zip(numbers, positions, strict=True)):
        ds = copy.deepcopy(base)
        ds.InstanceNumber = num
        ds.ImagePositionPatient = [0.0, 0.0, z]
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        if sizes and sizes[k]:
            r = sizes[k]
            arr = ds.pixel_array[:r, :r].copy()
            ds.Rows, ds.Columns = r, r
            ds.PixelData = arr.tobytes()
        p = folder / f"slice{k:03d}.dcm"
        ds.save_as(p)
        paths.append(p)
    return paths


def test_dicom_series_written_as_hu_volume(tmp_path, site):
    files = make_dicom_series(tmp_path / "dcm", 4, positions=[7.5, 0.0, 5.0, 2.5], numbers=[4, 1, 3, 2])
    ref = pydicom.dcmread(files[1])  # InstanceNumber 1 comes first
    res = ingest(tmp_path / "dcm", site=site)
    scan = site.scan(res.scan_id)
    vol = scan.array("volume")
    assert vol.shape == (4, 128, 128)
    assert tuple(vol.metadata.dimension_names) == ("slice", "y", "x")
    hu = ref.pixel_array * float(ref.RescaleSlope) + float(ref.RescaleIntercept)
    np.testing.assert_allclose(vol[0], hu, atol=1e-3)
    m = scan.manifest
    assert m.data_kind.value == "hu_images" and m.grid.pixel_size_mm == pytest.approx(float(ref.PixelSpacing[0]))
    assert "Patient" not in m.model_dump_json()  # no header values beyond geometry


# ---- idempotency and resumption -------------------------------------------------------------------------
def test_second_ingest_of_same_source_is_refused_and_writes_nothing(tmp_path, site, rng):
    src = tmp_path / "a.npy"
    np.save(src, rng.random((10, 1, 8)).astype("f4"))
    first = ingest(src, site=site, sidecar=IngestSidecar(**PARALLEL))
    with pytest.raises(AlreadyIngestedError, match=f"already ingested as scan '{first.scan_id}'") as info:
        ingest(src, site=site, sidecar=IngestSidecar(**PARALLEL), scan_id="other-scan")
    assert info.value.scan_id == first.scan_id
    assert scan_groups(site) == [first.scan_id]


def test_interrupted_ingest_resumes(tmp_path, site, rng, monkeypatch):
    import tasks.storage as storage

    data = rng.random((100, 2, 8)).astype("f4")
    src = tmp_path / "long.npy"
    np.save(src, data)
    real, calls = storage._write_block, {"n": 0}

    def flaky(*a):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real(*a)

    monkeypatch.setattr(storage, "_write_block", flaky)
    import dask

    with dask.config.set(scheduler="synchronous"), pytest.raises(OSError):
        ingest(src, site=site, sidecar=IngestSidecar(**PARALLEL))
    (sid,) = scan_groups(site)
    assert missing_chunks(site.scan(sid).array("projections")) > 0
    monkeypatch.setattr(storage, "_write_block", real)
    res = ingest(src, site=site, sidecar=IngestSidecar(**PARALLEL))
    assert res.scan_id == sid and res.result.chunks_present == 1
    np.testing.assert_array_equal(site.scan(sid).array("projections")[...], data)


# ---- bad input ------------------------------------------------------------------------------------------
def _npy(tmp_path, arr, name="bad.npy"):
    p = tmp_path / name
    np.save(p, arr)
    return p


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda t, r: _npy(t, r.random((4, 3, 2, 2)).astype("f4")), "2 .* or 3 .* dimensions"),
        (lambda t, r: _npy(t, r.random(7).astype("f4")), "dimensions"),
        (lambda t, r: _npy(t, np.zeros((0, 3, 4), "f4")), "zero-size axis"),
        (
            lambda t, r: _npy(t, np.array([[[1.0, np.nan]]] * 3, "f4")),
            r"non-finite value \(nan\) at bad.npy view 0, row 0, col 1",
        ),
        (
            lambda t, r: _npy(t, np.array([[[1.0, 2.0]], [[np.inf, 1.0]]], "f4")),
            r"non-finite value \(inf\) at bad.npy view 1",
        ),
        (lambda t, r: _npy(t, np.array([["a", "b"]])), "unsupported data type"),
    ],
)
def test_bad_npy_is_refused_and_store_untouched(tmp_path, site, rng, make, match):
    src = make(tmp_path, rng)
    with pytest.raises(InvalidInputError, match=match):
        ingest(src, site=site, sidecar=IngestSidecar(**PARALLEL))
    assert scan_groups(site) == []


def test_truncated_and_corrupt_files(tmp_path, site, rng):
    good = _npy(tmp_path, rng.random((50, 2, 30)).astype("f4"), "full.npy")
    trunc = tmp_path / "trunc.npy"
    trunc.write_bytes(good.read_bytes()[:3000])
    with pytest.raises(InvalidInputError, match="trunc.npy: truncated or corrupt NPY"):
        ingest(trunc, site=site, sidecar=IngestSidecar(**PARALLEL))
    junk = tmp_path / "junk.npy"
    junk.write_bytes(b"\x93NUMPY garbage" * 10)
    with pytest.raises(InvalidInputError, match="junk.npy: truncated or corrupt NPY"):
        ingest(junk, site=site, sidecar=IngestSidecar(**PARALLEL))
    tif = tmp_path / "v.tif"
    tifffile.imwrite(tif, rng.random((6, 8, 8)).astype("f4"))
    bad_tif = tmp_path / "cut.tif"
    bad_tif.write_bytes(tif.read_bytes()[:600])
    with pytest.raises(InvalidInputError, match="cut.tif: truncated or corrupt TIFF"):
        ingest(bad_tif, site=site, sidecar=IngestSidecar(**PARALLEL))
    zipbad = tmp_path / "z.npz"
    zipbad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(InvalidInputError, match="z.npz: truncated or corrupt NPZ"):
        ingest(zipbad, site=site, sidecar=IngestSidecar(**PARALLEL))
    assert scan_groups(site) == []


def test_negative_counts_and_missing_i0(tmp_path, site):
    counts = np.full((4, 1, 5), 100.0, "f4")
    counts[2, 0, 3] = -1
    src = _npy(tmp_path, counts, "neg.npy")
    with pytest.raises(InvalidInputError, match=r"negative counts \(-1.0\) at neg.npy view 2, row 0, col 3"):
        ingest(src, site=site, sidecar=IngestSidecar(data_kind="counts", i0_photons=1e3, **PARALLEL))
    with pytest.raises(InvalidInputError, match="need i0_photons"):
        ingest(src, site=site, sidecar=IngestSidecar(data_kind="counts", **PARALLEL))
    assert scan_groups(site) == []


def test_geometry_disagreements(tmp_path, site, rng):
    src = _npy(tmp_path, rng.random((36, 1, 16)).astype("f4"), "g.npy")
    wrong_views = {"geometry": {**PARALLEL["geometry"], "n_views": 720}}
    with pytest.raises(InvalidInputError, match="n_views=720 but the data has 36"):
        ingest(src, site=site, sidecar=IngestSidecar(**wrong_views))
    impossible = {"geometry": {**FAN["geometry"], "source_to_detector_mm": 300.0}}
    with pytest.raises(InvalidInputError, match="impossible geometry: .*must exceed"):
        ingest(src, site=site, sidecar=IngestSidecar(**impossible))
    bad_yaml = tmp_path / "g.npy.yaml"
    bad_yaml.write_text("geometry: {beam: cone}\n")
    with pytest.raises(InvalidInputError, match=r"g.npy.yaml: invalid sidecar: geometry.beam"):
        ingest(src, site=site)
    assert scan_groups(site) == []


def test_dicom_series_defects(tmp_path, site):
    make_dicom_series(tmp_path / "dup", 3, positions=[0.0, 2.5, 2.5])
    with pytest.raises(InvalidInputError, match="duplicate slice position .slice001.dcm and slice002.dcm"):
        ingest(tmp_path / "dup", site=site)
    make_dicom_series(tmp_path / "gap", 4, numbers=[1, 2, 3, 4], positions=[0.0, 2.5, 7.5, 10.0])
    with pytest.raises(InvalidInputError, match="a slice is missing between slice001.dcm and slice002.dcm"):
        ingest(tmp_path / "gap", site=site)
    make_dicom_series(tmp_path / "hole", 4, positions=[0.0, 2.5, 5.0, 12.5])
    with pytest.raises(InvalidInputError, match="a slice is missing between slice002.dcm and slice003.dcm"):
        ingest(tmp_path / "hole", site=site)
    make_dicom_series(tmp_path / "mixed", 3, sizes=[None, 64, None])
    with pytest.raises(
        InvalidInputError,
        match=r"mixes 2 different image sizes \(Rows/Columns\) \(slice000.dcm, slice002.dcm; slice001.dcm\)",
    ):
        ingest(tmp_path / "mixed", site=site)
    files = make_dicom_series(tmp_path / "corrupt", 3)
    files[1].write_bytes(files[1].read_bytes()[:2000])
    with pytest.raises(InvalidInputError, match="slice001.dcm"):
        ingest(tmp_path / "corrupt", site=site)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.dcm").write_bytes(b"not dicom at all")
    with pytest.raises(InvalidInputError, match="a.dcm: not a readable DICOM"):
        ingest(junk, site=site)
    assert scan_groups(site) == []


def test_unknown_sources(tmp_path):
    with pytest.raises(InvalidInputError, match="no such file"):
        open_source(tmp_path / "missing.npy")
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(InvalidInputError, match="unknown file type"):
        open_source(tmp_path / "x.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInputError, match="no TIFF or DICOM"):
        open_source(tmp_path / "empty")


# ---- no silent assumption, duplicates by content ---------------------------------------------------------
def test_an_array_without_sidecar_is_refused_naming_the_options(tmp_path, site, rng):
    src = tmp_path / "raw.npy"
    np.save(src, rng.random((8, 1, 6)).astype("f4"))
    with pytest.raises(InvalidInputError, match=r"raw.npy: nothing says what this array holds") as info:
        ingest(src, site=site)
    msg = str(info.value)
    assert "--data-kind" in msg and "--geometry" in msg and "raw.npy.yaml" in msg and "fedscan-site.yaml" in msg
    assert scan_groups(site) == []
    from typer.testing import CliRunner

    from flows.cli import app

    args = ["ingest", str(src), "--site", "site-a", "--store", str(tmp_path)]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 2 and "--data-kind" in out.output and len(out.output.strip().splitlines()) == 1
    out = CliRunner().invoke(app, [*args, "--data-kind", "line_integrals", "--beam", "parallel"])
    assert out.exit_code == 0, out.output


def test_a_site_default_states_the_kind_and_a_sidecar_refines_it(tmp_path, site, rng):
    incoming = tmp_path / "incoming" / "site-a"
    incoming.mkdir(parents=True)
    (incoming / "fedscan-site.yaml").write_text(
        yaml.safe_dump({"data_kind": "counts", "i0_photons": 5e3, **FAN, "labels": {"protocol": "bench"}})
    )
    a = incoming / "a.npy"
    np.save(a, rng.poisson(100, (12, 1, 16)).astype("u2"))
    m = site.scan(ingest(a, site=site).scan_id).manifest
    assert m.data_kind.value == "counts" and m.i0_photons == 5e3 and m.geometry.source_to_detector_mm == 900.0
    b = incoming / "b.npy"
    np.save(b, rng.poisson(100, (12, 1, 16)).astype("u2"))
    write_sidecar(b, {"geometry": {"source_to_detector_mm": 1000.0}, "i0_photons": 2e3})
    m = site.scan(ingest(b, site=site).scan_id).manifest
    assert m.geometry.source_to_detector_mm == 1000.0 and m.geometry.source_to_isocenter_mm == 500.0  # merged
    assert m.i0_photons == 2e3 and m.labels == {"protocol": "bench"}


def test_the_same_contents_under_other_names_are_already_ingested(tmp_path, site, rng):
    src = tmp_path / "first.npy"
    np.save(src, rng.random((10, 1, 8)).astype("f4"))
    first = ingest(src, site=site, sidecar=IngestSidecar(**PARALLEL))
    renamed = tmp_path / "other" / "DOE_JANE.npy"
    renamed.parent.mkdir()
    renamed.write_bytes(src.read_bytes())
    with pytest.raises(AlreadyIngestedError, match=f"already ingested as scan '{first.scan_id}'"):
        ingest(renamed, site=site, sidecar=IngestSidecar(**PARALLEL))
    files = make_dicom_series(tmp_path / "dcm", 3)
    series = ingest(tmp_path / "dcm", site=site)
    moved = tmp_path / "dcm2"
    moved.mkdir()
    for k, f in enumerate(reversed(files)):  # other names, other name order: the same slices in space
        (moved / f"x{k}.dcm").write_bytes(f.read_bytes())
    from typer.testing import CliRunner

    from flows.cli import app

    out = CliRunner().invoke(app, ["ingest", str(moved), "--site", "site-a", "--store", str(tmp_path)])
    assert out.exit_code == 3 and f"already ingested as scan '{series.scan_id}'" in out.output
    assert len(scan_groups(site)) == 2
