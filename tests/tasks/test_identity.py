"""Identity never reaches a scan's manifest, arrays, task-run names or ids; the site's id map keeps the names."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml
from pydicom.data import get_testdata_file

from schemas.ingest import IngestSidecar
from tasks.errors import InvalidInputError
from tasks.identity import IDENTITY_GROUP, SiteIdentity
from tasks.ingest import ingest
from tasks.prefect_tasks import ingest_scan
from tasks.sources import READERS, open_source
from tasks.storage import SiteStore

PARALLEL = {"geometry": {"beam": "parallel", "angular_range_deg": 180}}
PATIENT_FILE = "DOE_JANE_19700101_MRN123456.npy"
PATIENT_PARTS = ("DOE", "JANE", "19700101", "123456")


@pytest.fixture
def site(tmp_path) -> SiteStore:
    return SiteStore.create(tmp_path / "site-a.zarr", site_id="site-a")


def _zarr_json_texts(store: Path, *, skip: str | None = None) -> dict[str, str]:
    """Every metadata document of a local store (optionally without one top-level group)."""
    return {
        str(p.relative_to(store)): p.read_text()
        for p in store.rglob("zarr.json")
        if skip is None or p.relative_to(store).parts[0] != skip
    }


def _patient_named_source(tmp_path: Path, rng: np.random.Generator) -> Path:
    src = tmp_path / PATIENT_FILE
    np.save(src, rng.random((12, 1, 8)).astype("f4"))
    src.with_name(src.name + ".yaml").write_text(yaml.safe_dump({**PARALLEL, "labels": {"protocol": "abdomen"}}))
    return src


def test_scan_id_never_comes_from_the_file_name(tmp_path, site, rng):
    src = _patient_named_source(tmp_path, rng)
    res = ingest(src, site=site)
    assert res.scan_id.startswith("scan-")
    manifest = site.scan(res.scan_id).manifest
    shown = [res.scan_id, manifest.model_dump_json()]
    # the fields the ingest task's run name is made of
    name_fields = {"source": src, "site_id": "site-a", "data_root": str(tmp_path)}
    run_name = ingest_scan.task_run_name.format(**name_fields)
    shown.append(run_name)
    for text in shown:
        for part in PATIENT_PARTS:
            assert part not in text, (part, text)
    assert [f.name for f in manifest.source_files] == ["file-00000.npy"]
    # the whole store outside the site-only identity group holds none of it either
    for doc, text in _zarr_json_texts(Path(site.uri), skip=IDENTITY_GROUP).items():
        assert not any(part in text for part in PATIENT_PARTS), doc
    # the mapping source name -> scan id stays in the site store's id map
    assert SiteIdentity(site).source_of(res.scan_id) == {"source": str(src), "names": [PATIENT_FILE]}


def test_keyed_ids_are_stable_at_one_site_and_differ_between_sites(tmp_path, rng):
    data = rng.random((6, 1, 4)).astype("f4")
    ids = []
    for name in ("one", "two"):
        site = SiteStore.create(tmp_path / f"{name}.zarr", site_id=name)
        src = tmp_path / f"{name}.npy"
        np.save(src, data)
        first = SiteIdentity(site).keyed_scan_id("ab" * 32)
        assert SiteIdentity(SiteStore.open(site.uri)).keyed_scan_id("ab" * 32) == first  # the key persists
        ids.append(first)
        res = ingest(src, site=site, sidecar=IngestSidecar(**PARALLEL))
        assert res.scan_id.startswith("scan-") and len(res.scan_id) == 21
        assert not any(c.isdigit() for c in res.scan_id)
    assert ids[0] != ids[1]


@pytest.mark.parametrize("bad", ["DOE_JANE_19700101", "Jane-Doe", "mrn-123456"])
def test_identifying_scan_ids_are_refused_before_anything_is_written(tmp_path, site, rng, bad):
    src = tmp_path / "x.npy"
    np.save(src, rng.random((6, 1, 4)).astype("f4"))
    with pytest.raises(InvalidInputError, match="scan id looks like identity") as info:
        ingest(src, site=site, sidecar=IngestSidecar(scan_id=bad, **PARALLEL))
    assert bad not in str(info.value)
    with pytest.raises(InvalidInputError, match="scan id looks like identity"):
        ingest(src, site=site, sidecar=IngestSidecar(**PARALLEL), scan_id=bad)
    assert SiteStore.open(site.uri).scan_ids() == []


def test_labels_outside_the_allow_list_or_identifying_are_refused(tmp_path, site, rng):
    src = tmp_path / "x.npy"
    np.save(src, rng.random((6, 1, 4)).astype("f4"))
    with pytest.raises(InvalidInputError, match="label value of key 'protocol' looks like identity") as info:
        ingest(src, site=site, sidecar=IngestSidecar.model_construct(labels={"protocol": "DOE^JANE dob 1970-01-01"}))
    assert "DOE" not in str(info.value) and "1970" not in str(info.value)
    for key in ("pat_id", "PID", "subject_id", "nhs_number", "email", "SocialSecurityNumber", "postcode"):
        with pytest.raises(InvalidInputError, match="must not identify a patient"):
            ingest(src, site=site, sidecar=IngestSidecar.model_construct(labels={key: "x"}, **PARALLEL))
    with pytest.raises(InvalidInputError, match=r"\['grade'\] are not in the site's allow-list"):
        ingest(src, site=site, sidecar=IngestSidecar(labels={"grade": "2"}, **PARALLEL))
    assert SiteStore.open(site.uri).scan_ids() == []
    assert not (Path(site.uri) / IDENTITY_GROUP).exists()  # refused input leaves the store as it was
    # a site adds its own keys (never identifying ones), and they persist in its store
    with pytest.raises(InvalidInputError, match="could identify a patient"):
        SiteIdentity(site).allow_label_keys(["patient_age"])
    SiteIdentity(site).allow_label_keys(["grade"])
    assert "grade" in SiteIdentity(SiteStore.open(site.uri)).label_keys()
    labels = {"grade": "2", "protocol": "abdomen", "body_part": "liver", "kvp": 120, "contrast": True}
    res = ingest(src, site=site, sidecar=IngestSidecar(labels=labels, **PARALLEL))
    assert site.scan(res.scan_id).manifest.labels == labels


IDENTITY_ATTRIBUTES = {
    "PatientName": "DOE^JANE",
    "PatientID": "MRN7654321",
    "PatientBirthDate": "19700101",
    "StudyDate": "20240317",
    "AccessionNumber": "ACC9081726",
    "InstitutionName": "Saint Elsewhere Hospital",
}


def _identified_series(folder: Path, n: int = 3, *, suffix: str = ".dcm") -> list[Path]:
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n):
        ds = copy.deepcopy(base)
        for attr, value in IDENTITY_ATTRIBUTES.items():
            setattr(ds, attr, value)
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [0.0, 0.0, 2.5 * k]
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        p = folder / f"img{k}{suffix}"
        ds.save_as(p)
        paths.append(p)
    return paths


def test_dicom_identity_attributes_never_reach_the_store(tmp_path, site):
    files = _identified_series(tmp_path / "series")
    assert pydicom.dcmread(files[0]).PatientName == "DOE^JANE"  # the source really holds them
    res = ingest(tmp_path / "series", site=site)
    docs = _zarr_json_texts(Path(site.uri))  # all of them, the id map included
    assert any(res.scan_id in doc for doc in docs)
    values = [*IDENTITY_ATTRIBUTES.values(), "DOE", "JANE", "7654321", "9081726", "Elsewhere", "2024-03-17"]
    for doc, text in docs.items():
        for value in values:
            assert value not in text, (value, doc)


def test_ima_files_are_read_as_dicom(tmp_path, site):
    (ima,) = _identified_series(tmp_path / "siemens", 1, suffix=".IMA")
    assert READERS[".ima"] is READERS[".dcm"]
    assert open_source(ima).reader == "dicom-series"
    res = ingest(ima, site=site)
    scan = site.scan(res.scan_id)
    assert scan.manifest.data_kind.value == "hu_images" and scan.array("volume").shape == (1, 128, 128)
    assert [f.name for f in scan.manifest.source_files] == ["file-00000.ima"]
    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(2):
        shutil.copy(_identified_series(tmp_path / f"s{i}", 2, suffix=".ima")[i], folder / f"{i}.ima")
    assert open_source(folder).shape[0] == 2


def _identity_worker(store: str, k: int) -> tuple[str, str]:
    from tasks.identity import SiteIdentity
    from tasks.storage import SiteStore

    site = SiteStore.open(store)
    identity = SiteIdentity(site)
    scan_id = identity.keyed_scan_id("ab" * 32)  # the same content at the same site: one id
    identity.record_source(f"scan-{k}", source=f"in/{k}.npy", names=[f"{k}.npy"])
    return scan_id, SiteIdentity(SiteStore.open(store)).keyed_scan_id("ab" * 32)


def test_concurrent_ingest_processes_share_one_site_secret_and_lose_no_id_map_entry(tmp_path):
    import multiprocessing

    from tasks.identity import SiteIdentity
    from tasks.storage import SiteStore

    store = str(tmp_path / "site-c.zarr")
    SiteStore.create(store, site_id="site-c")
    with multiprocessing.get_context("spawn").Pool(6) as pool:
        results = pool.starmap(_identity_worker, [(store, k) for k in range(12)])
    ids = {first for first, _ in results} | {again for _, again in results}
    assert len(ids) == 1  # every process saw the secret the first one made
    identity = SiteIdentity(SiteStore.open(store))
    assert identity.keyed_scan_id("ab" * 32) in ids
    assert all(identity.source_of(f"scan-{k}") == {"source": f"in/{k}.npy", "names": [f"{k}.npy"]} for k in range(12))
