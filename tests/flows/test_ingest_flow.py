from __future__ import annotations

import numpy as np
import pytest
import yaml

from flows.ingest import IngestRequest, ingest_scans
from tasks.errors import TransientError
from tasks.prefect_tasks import ingest_scan, is_transient
from tasks.storage import SiteStore


def _source(tmp_path, rng, name="scan.npy", views=20):
    src = tmp_path / name
    np.save(src, rng.random((views, 1, 12)).astype("f4"))
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({"geometry": {"beam": "parallel"}}))
    return src


def test_ingest_task_fn_is_idempotent(tmp_path, rng):
    src = _source(tmp_path, rng)
    root = str(tmp_path / "data")
    first = ingest_scan.fn(src, site_id="a", data_root=root)
    second = ingest_scan.fn(src, site_id="a", data_root=root)  # already ingested: same ref, nothing new
    assert first == second
    assert SiteStore.open(first.store_uri).scan_ids() == [first.scan_id]


def test_only_transient_faults_are_retried():
    assert is_transient(TransientError("worker lost"))
    assert is_transient(ConnectionResetError())
    assert not is_transient(ValueError("bad input"))
    assert not is_transient(OSError(28, "No space left on device"))


@pytest.mark.slow
def test_ingest_flow_runs_on_prefect(prefect_harness, tmp_path, rng):
    a = _source(tmp_path, rng, "a.npy")
    b = _source(tmp_path, rng, "b.npy", views=30)
    root = str(tmp_path / "data")
    refs = ingest_scans(IngestRequest(site_id="site-x", sources=(a, b), data_root=root))
    # scan ids are keyed, never taken from the file names (a.npy, b.npy)
    assert all(r.scan_id.startswith("scan-") for r in refs) and len({r.scan_id for r in refs}) == 2
    site = SiteStore.open(refs[0].store_uri)
    assert sorted(site.scan_ids()) == sorted(r.scan_id for r in refs)
    assert all(s.is_done("ingest") for s in site.scans())


@pytest.mark.slow
def test_ingest_flow_without_data_root_writes_into_the_setting(prefect_harness, tmp_path, rng, monkeypatch):
    from schemas.settings import get_settings

    root = tmp_path / "from-setting"
    monkeypatch.setenv("FEDSCAN_DATA_ROOT", str(root))
    get_settings.cache_clear()
    try:
        (ref,) = ingest_scans(IngestRequest(site_id="site-y", sources=(_source(tmp_path, rng),)))
    finally:
        get_settings.cache_clear()
    assert ref.store_uri.startswith(str(root)) and (root / "site-y.zarr").is_dir()
