"""Discovery over every store kind (a local folder, ``memory://``, S3 on loopback) and known-bad scans."""

from __future__ import annotations

import uuid

import dask.array as da
import numpy as np
import pytest

from flows.pipeline import ScanOutcome
from schemas.denoise import DenoiseConfig
from schemas.geometry import Geometry, ReconGrid
from schemas.ingest import IngestConfig
from schemas.manifest import ScanManifest
from schemas.pipeline import PipelineConfig
from schemas.stages import PIPELINE
from tasks.errors import InvalidInputError, StoreNotFoundError
from tasks.pipeline_support import discover, record_failures, site_uris
from tasks.storage import SiteStore, StageOutput, find_site_stores, site_store_uri


def ingested_site(root: str, site_id: str, n_scans: int = 1, *, sha_seed: int = 0) -> SiteStore:
    """A site store at ``root`` (any URL) whose scans finished ingest (8 views × 1 row × 16 cols)."""
    grid = ReconGrid(nx_pixels=16, ny_pixels=16, pixel_size_mm=1.0)
    geometry = Geometry(
        beam="parallel", n_views=8, n_detector_cols=16, n_detector_rows=1, detector_pitch_mm=1.0, grid=grid
    )
    site = SiteStore.open_or_create(site_store_uri(root, site_id), site_id=site_id)
    for k in range(n_scans):
        sha = f"{sha_seed:08x}{k:056x}"
        scan = site.create_scan(
            ScanManifest(
                scan_id=f"{site_id}-{k}",
                site_id=site_id,
                data_kind="line_integrals",
                geometry=geometry,
                source_sha256=sha,
            )
        )
        scan.run_stage(
            stage="ingest",
            config=IngestConfig(source_sha256=sha, reader="npy", data_kind="line_integrals"),
            outputs=[StageOutput("projections", da.zeros((8, 1, 16), dtype=np.float32), ("view", "row", "col"))],
        )
    return site


@pytest.fixture(params=["local", "memory", "s3"])
def data_root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path)
    if request.param == "memory":
        return f"memory://fedscan-{uuid.uuid4().hex[:8]}"
    return request.getfixturevalue("s3_bucket") + "/data"


def configs(config: PipelineConfig | None = None) -> dict:
    config = config or PipelineConfig()
    return {spec.name: config.stage_config(spec.name) for spec in PIPELINE}


def test_discovery_finds_the_site_stores_and_their_scans_under_any_url(data_root):
    ingested_site(data_root, "A", n_scans=2)
    ingested_site(data_root, "B")
    SiteStore.create(site_store_uri(data_root, "C"), site_id="C")  # a store with no scan yet
    import fsspec

    fs, path = fsspec.core.url_to_fs(data_root)
    fs.makedirs(f"{path}/notes.zarr", exist_ok=True)
    fs.pipe(f"{path}/notes.zarr/readme.txt", b"not a store")  # named like one, but no fedscan group
    fs.pipe(f"{path}/report.html", b"<html>")
    found = [str(p) for p in find_site_stores(data_root)]
    assert found == [site_store_uri(data_root, s) for s in ("A", "B", "C")]
    assert site_uris(data_root) == found
    todo = discover(data_root, configs=configs()).todo
    assert sorted((r.site_id, r.scan_id) for r in todo) == [("A", "A-0"), ("A", "A-1"), ("B", "B-0")]
    assert {r.store_uri for r in todo} == {site_store_uri(data_root, "A"), site_store_uri(data_root, "B")}


@pytest.mark.parametrize("url", ["nosuchproto://bucket/data", "memory://never-written-here"])
def test_an_unknown_or_missing_url_is_one_line_naming_it(url):
    with pytest.raises((InvalidInputError, StoreNotFoundError)) as raised:
        find_site_stores(url)
    assert url in str(raised.value) and "\n" not in str(raised.value)


def test_a_scan_that_failed_is_skipped_until_its_inputs_change(tmp_path):
    root = str(tmp_path)
    ingested_site(root, "A", n_scans=2)
    first = discover(root, configs=configs())
    assert len(first.todo) == 2 and first.known_failures == []
    bad, good = first.todo
    failed = ScanOutcome(scan=str(bad), ok=False, failed_stage="denoise", error="ValueError: non-finite")
    record_failures([bad, good], [failed, ScanOutcome(scan=str(good), ok=True)], configs())
    marker = SiteStore.open(tmp_path / "A.zarr").scan(bad.scan_id).failure()
    assert marker is not None and marker["stage"] == "denoise" and "non-finite" in marker["error"]

    again = discover(root, configs=configs())  # same config, same input: listed, not retried
    assert [str(r) for r in again.todo] == [str(good)]
    (known,) = again.known_failures
    assert (known.scan, known.stage, known.since) == (str(bad), "denoise", marker["since"])
    # failing again under the same input keeps the first date
    record_failures([bad], [failed], configs())
    assert SiteStore.open(tmp_path / "A.zarr").scan(bad.scan_id).failure()["since"] == marker["since"]

    assert str(bad) in [str(r) for r in discover(root, configs=configs(), retry_known_failures=True).todo]
    changed = configs(PipelineConfig(denoise=DenoiseConfig(view_stride=2)))
    assert str(bad) in [str(r) for r in discover(root, configs=changed).todo]  # a changed config retries

    # it goes through later: the marker is cleared
    record_failures([bad], [ScanOutcome(scan=str(bad), ok=True)], configs())
    assert SiteStore.open(tmp_path / "A.zarr").scan(bad.scan_id).failure() is None


def test_a_reingested_scan_and_a_transient_failure_are_retried(tmp_path):
    root = str(tmp_path)
    ingested_site(root, "A")
    (ref,) = discover(root, configs=configs()).todo
    lease = ScanOutcome(scan=str(ref), ok=False, failed_stage="denoise", error="LeaseHeldError", transient=True)
    record_failures([ref], [lease], configs())
    assert SiteStore.open(tmp_path / "A.zarr").scan(ref.scan_id).failure() is None
    record_failures([ref], [ScanOutcome(scan=str(ref), ok=False, failed_stage="denoise")], configs())
    assert discover(root, configs=configs()).todo == []
    scan = SiteStore.open(tmp_path / "A.zarr").scan(ref.scan_id)  # a re-ingest: new source digest
    sha = "f" * 64
    scan.run_stage(
        stage="ingest",
        config=IngestConfig(source_sha256=sha, reader="npy", data_kind="line_integrals"),
        outputs=[StageOutput("projections", da.ones((8, 1, 16), dtype=np.float32), ("view", "row", "col"))],
    )
    assert [str(r) for r in discover(root, configs=configs()).todo] == [str(ref)]
