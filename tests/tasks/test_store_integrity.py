"""Integrity of a site store: chunk checksums, corrupt metadata, verify and migrate, disk-full errors.

Corruption is made the way it happens: bytes of a real chunk file or metadata document of a real local store are
changed on disk, then the store is read through fedscan's own API, a stage driver and the CLI.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
import zarr
from typer.testing import CliRunner
from zarr.codecs import BloscCodec, BloscShuffle

import tasks.storage as storage
from flows.cli import app
from schemas.base import StageConfig
from schemas.geometry import Geometry, ReconGrid
from schemas.ingest import IngestSidecar
from schemas.manifest import ScanManifest
from tasks.errors import (
    CorruptChunkError,
    CorruptMetadataError,
    FedscanError,
    InvalidInputError,
    StoreWriteError,
)
from tasks.storage import SiteStore, StageOutput, has_checksums, migrate_store, missing_chunks, verify_store

runner = CliRunner()


class Cfg(StageConfig):
    scale: float = 2.0


GEOM = Geometry(
    beam="parallel",
    n_views=16,
    n_detector_cols=8,
    n_detector_rows=3,
    detector_pitch_mm=1.0,
    grid=ReconGrid(nx_pixels=8, ny_pixels=8, pixel_size_mm=1.0),
)


def manifest(scan_id: str = "s1", sha: str = "a" * 64) -> ScanManifest:
    return ScanManifest(scan_id=scan_id, site_id="site-a", data_kind="line_integrals", geometry=GEOM, source_sha256=sha)


DATA = np.random.default_rng(5).standard_normal((16, 3, 8)).astype("f4")


def write_stage(site: SiteStore, scan_id: str = "s1", data: np.ndarray = DATA) -> None:
    scan = site.create_scan(manifest(scan_id))
    out = StageOutput("p", da.from_array(data, chunks=(4, 3, 8)), ("view", "row", "col"), (4, 3, 8))
    scan.run_stage(stage="ingest", config=Cfg(), outputs=[out])


@pytest.fixture
def store(tmp_path: Path) -> Path:
    path = tmp_path / "site-a.zarr"
    write_stage(SiteStore.create(path, site_id="site-a"))
    return path


def chunk_file(store: Path, key: str = "c/1/0/0", scan: str = "s1", array: str = "p") -> Path:
    return store / "scans" / scan / array / key


def flip_bit(path: Path, bit: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[bit // 8] ^= 1 << (bit % 8)
    path.write_bytes(bytes(raw))


# ---- checksums -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["memory", "local"])
def test_every_array_a_stage_writes_ends_in_a_crc32c_checksum(kind, tmp_path):
    site = SiteStore.create(zarr.storage.MemoryStore() if kind == "memory" else tmp_path / "a.zarr", site_id="site-a")
    write_stage(site)
    arr = site.scan("s1").array("p")
    assert has_checksums(arr)
    assert [type(c).__name__ for c in arr.metadata.codecs][-2:] == ["BloscCodec", "Crc32cCodec"]
    np.testing.assert_array_equal(arr[...], DATA)


def test_every_single_bit_flip_in_a_chunk_fails_its_read_naming_array_chunk_and_scan(store):
    path = chunk_file(store)
    good = path.read_bytes()
    bits = np.random.default_rng(0).choice(len(good) * 8, size=40, replace=False)
    for bit in bits:
        flip_bit(path, int(bit))
        scan = SiteStore.open(store, mode="r").scan("s1")
        with pytest.raises(CorruptChunkError) as err:
            scan.array("p")[...]
        assert (err.value.array, err.value.chunk_key, err.value.scan_id) == ("p", "c/1/0/0", "s1")
        assert str(store) in str(err.value) and "checksum mismatch" in str(err.value)
        path.write_bytes(good)
    np.testing.assert_array_equal(SiteStore.open(store, mode="r").scan("s1").array("p")[...], DATA)


def test_a_corrupt_chunk_fails_a_dask_read_and_leaves_the_other_chunks_readable(store):
    flip_bit(chunk_file(store, "c/2/0/0"), 77)
    scan = SiteStore.open(store, mode="r").scan("s1")
    with dask.config.set(scheduler="threads"), pytest.raises(CorruptChunkError, match=r"'c/2/0/0' of array 'p'"):
        scan.read("p").sum().compute()
    np.testing.assert_array_equal(scan.array("p")[:8], DATA[:8])  # chunks 0 and 1 are fine
    np.testing.assert_array_equal(scan.array("p")[12:], DATA[12:])


def test_a_truncated_chunk_is_the_same_named_error_not_a_decompressor_message(store):
    path = chunk_file(store, "c/3/0/0")
    path.write_bytes(path.read_bytes()[:-17])
    with pytest.raises(CorruptChunkError) as err:
        SiteStore.open(store, mode="r").scan("s1").array("p")[...]
    assert err.value.chunk_key == "c/3/0/0" and "blosc" not in str(err.value)
    assert isinstance(err.value, FedscanError) and isinstance(err.value, ValueError)


def test_a_stage_reading_a_corrupt_chunk_fails_that_scan_and_not_the_others(tmp_path):
    import torch

    from schemas.denoise import DenoiseConfig
    from tasks.ingest import ingest
    from tasks.stages import run_scan_stage

    site = SiteStore.create(tmp_path / "site-a.zarr", site_id="site-a")
    rng = np.random.default_rng(3)
    for name in ("ok", "bad"):
        src = tmp_path / f"{name}.npy"
        np.save(src, (rng.random((48, 2, 32)) + 0.5).astype("f4"))
        sidecar = IngestSidecar.model_validate(
            {"scan_id": name, "geometry": {"beam": "parallel", "angular_range_deg": 180}}
        )
        ingest(src, site=site, sidecar=sidecar)
    key = sorted(k for k in storage.present_chunk_keys(site.scan("bad").array("projections")) if k.startswith("c/"))[-1]
    flip_bit(tmp_path / "site-a.zarr" / "scans" / "bad" / "projections" / key, 100)
    with dask.config.set(scheduler="threads"):
        config = DenoiseConfig(domain="log")
        cpu = torch.device("cpu")
        assert run_scan_stage(site.scan("ok"), "denoise", config, device=cpu).state == "done"
        with pytest.raises(CorruptChunkError) as err:
            run_scan_stage(site.scan("bad"), "denoise", config, device=cpu)
    assert (err.value.scan_id, err.value.array, err.value.chunk_key) == ("bad", "projections", key)
    assert site.scan("ok").is_done("denoise") and not site.scan("bad").is_done("denoise")


# ---- verify --------------------------------------------------------------------------------------
def test_verify_finds_each_corrupt_chunk_and_bad_record_and_passes_a_clean_store(store):
    clean = verify_store(store)
    assert clean.ok and (clean.scans, clean.arrays, clean.chunks, clean.records) == (1, 1, 4, 1)
    flip_bit(chunk_file(store, "c/0/0/0"), 9)
    chunk_file(store, "c/3/0/0").write_bytes(chunk_file(store, "c/3/0/0").read_bytes()[:5])
    chunk_file(store, "c/2/0/0").unlink()  # a recorded-complete stage lost a chunk
    report = verify_store(store)
    lines = sorted(p.line() for p in report.problems)
    assert lines == [
        "site site-a  scan s1  array p  chunk c/0/0/0: checksum mismatch",
        "site site-a  scan s1  array p  chunk c/3/0/0: checksum mismatch",
        "site site-a  scan s1  array p: stage 'ingest' is recorded done but 1 chunks are missing",
    ]


def test_verify_command_prints_one_line_per_problem_and_exits_nonzero(store, tmp_path):
    ok = runner.invoke(app, ["verify", str(store)])
    assert ok.exit_code == 0, ok.output
    assert "4 chunks of 1 arrays in 1 scans, 1 stage records: no problems" in ok.output
    flip_bit(chunk_file(store), 3)
    bad = runner.invoke(app, ["verify", str(tmp_path)])  # a folder of stores
    assert bad.exit_code == 4, bad.output
    assert "corrupt: site site-a  scan s1  array p  chunk c/1/0/0: checksum mismatch" in bad.output
    assert "Traceback" not in bad.output


@pytest.mark.parametrize(
    ("document", "text"),
    [("scans/s1/zarr.json", "{not json"), ("scans/s1/p/zarr.json", '{"zarr_format": 3}'), ("zarr.json", "")],
)
def test_a_corrupt_metadata_document_is_one_line_naming_it_in_inspect_and_verify(store, document, text):
    (store / document).write_text(text)
    out = runner.invoke(app, ["inspect", str(store)])
    assert out.exit_code == 2, out.output
    (error,) = [line for line in out.output.splitlines() if "error" in line]  # the lines before it are inspect's
    assert error.startswith(f"fedscan: error: {store}/{document}: corrupt metadata document (")
    assert "Traceback" not in out.output
    checked = runner.invoke(app, ["verify", str(store)])
    assert checked.exit_code == 4 and f"{store}/{document}" in checked.output and "Traceback" not in checked.output


def test_a_corrupt_scan_document_fails_that_scan_only(store):
    site = SiteStore.open(store)
    write_stage(site, "s2")
    (store / "scans" / "s1" / "zarr.json").write_text("{")
    site = SiteStore.open(store, mode="r")
    assert site.scan_ids() == ["s1", "s2"]
    with pytest.raises(CorruptMetadataError, match=r"scans/s1/zarr\.json"):
        site.scan("s1")
    np.testing.assert_array_equal(site.scan("s2").array("p")[...], DATA)


# ---- migrate -------------------------------------------------------------------------------------
def legacy_store(tmp_path: Path) -> Path:
    """A store as fedscan wrote it before checksums: Blosc only."""
    path = tmp_path / "old.zarr"
    site = SiteStore.create(path, site_id="site-a")
    real = storage.default_compressors
    storage.default_compressors = lambda: (BloscCodec(cname="zstd", clevel=1, shuffle=BloscShuffle.bitshuffle),)
    try:
        write_stage(site)
    finally:
        storage.default_compressors = real
    return path


def test_migrate_adds_checksums_keeps_the_data_and_then_catches_a_flip(tmp_path):
    path = legacy_store(tmp_path)
    assert not has_checksums(SiteStore.open(path).scan("s1").array("p"))
    before = verify_store(path)
    assert before.ok and before.without_checksums == ["s1/p"]
    report = migrate_store(path)
    assert (report.arrays, report.chunks) == (["s1/p"], 4)
    arr = SiteStore.open(path).scan("s1").array("p")
    assert has_checksums(arr) and missing_chunks(arr) == 0
    np.testing.assert_array_equal(arr[...], DATA)
    assert verify_store(path).ok and not verify_store(path).without_checksums
    assert migrate_store(path).arrays == []  # idempotent
    flip_bit(chunk_file(path), 200)
    assert [p.key for p in verify_store(path).problems] == ["c/1/0/0"]


def test_an_interrupted_migration_resumes(tmp_path, monkeypatch):
    path = legacy_store(tmp_path)
    real, calls = zarr.storage.LocalStore.set, {"n": 0}

    async def failing(self, key, value):
        if "/c/" in key:
            calls["n"] += 1
            if calls["n"] == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
        return await real(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", failing)
    with pytest.raises(StoreWriteError, match=r"chunk 'c/2/0/0' of array 'p'.*No space left"):
        migrate_store(path)
    monkeypatch.setattr(zarr.storage.LocalStore, "set", real)
    assert migrate_store(path).chunks == 2  # the two chunks done before the fault are not touched again
    np.testing.assert_array_equal(SiteStore.open(path).scan("s1").array("p")[...], DATA)
    assert verify_store(path).ok


def test_verify_migrate_command(tmp_path):
    path = legacy_store(tmp_path)
    out = runner.invoke(app, ["verify", str(path)])
    assert out.exit_code == 0 and "1 arrays without checksums (fedscan verify --migrate)" in out.output
    out = runner.invoke(app, ["verify", "--migrate", str(path)])
    assert out.exit_code == 0, out.output
    assert "migrated 1 arrays (4 chunks) to crc32c checksums" in out.output
    assert has_checksums(SiteStore.open(path).scan("s1").array("p"))


def test_an_interrupted_write_of_an_array_without_checksums_is_redone_with_them(tmp_path):
    path = legacy_store(tmp_path)
    scan = SiteStore.open(path).scan("s1")
    scan._drop_record("ingest")  # as if the write had been interrupted before its record
    out = StageOutput("p", da.from_array(DATA, chunks=(4, 3, 8)), ("view", "row", "col"), (4, 3, 8))
    res = scan.run_stage(stage="ingest", config=Cfg(), outputs=[out])
    assert res.chunks_written == 4 and has_checksums(scan.array("p"))


# ---- disk full -----------------------------------------------------------------------------------
def enospc_on(monkeypatch, match) -> dict[str, int]:
    """Make the local store's writes of keys for which ``match(key)`` holds fail with ENOSPC (what a full disk
    gives); the store's own write is replaced, so this exercises fedscan's handling, not the kernel's."""
    real, seen = zarr.storage.LocalStore.set, {"n": 0}

    async def full(self, key, value):
        if match(key):
            seen["n"] += 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return await real(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", full)
    return seen


def test_a_full_disk_while_writing_a_chunk_names_the_store_and_the_array(tmp_path, monkeypatch):
    path = tmp_path / "site-a.zarr"
    site = SiteStore.create(path, site_id="site-a")
    scan = site.create_scan(manifest())
    seen = enospc_on(monkeypatch, lambda key: key.startswith("scans/s1/p/c/2"))
    out = StageOutput("p", da.from_array(DATA, chunks=(4, 3, 8)), ("view", "row", "col"), (4, 3, 8))
    with dask.config.set(scheduler="synchronous"), pytest.raises(StoreWriteError) as err:
        scan.run_stage(stage="ingest", config=Cfg(), outputs=[out])
    assert seen["n"] == 1 and err.value.errno == errno.ENOSPC and isinstance(err.value, OSError)
    assert f"scan 's1' of {path}: writing array 'p' failed: [Errno 28] No space left on device" == str(err.value)
    assert isinstance(err.value.__cause__, OSError)
    monkeypatch.undo()
    res = scan.run_stage(stage="ingest", config=Cfg(), outputs=[out])
    assert res.chunks_written >= 1 and res.chunks_written + res.chunks_present == 4
    np.testing.assert_array_equal(scan.array("p")[...], DATA)


def test_a_full_disk_while_writing_the_record_leaves_the_stage_not_done(tmp_path, monkeypatch):
    path = tmp_path / "site-a.zarr"
    scan = SiteStore.create(path, site_id="site-a").create_scan(manifest())
    enospc_on(monkeypatch, lambda key: key == "scans/s1/zarr.json")
    out = StageOutput("p", da.from_array(DATA, chunks=(4, 3, 8)), ("view", "row", "col"), (4, 3, 8))
    with pytest.raises(StoreWriteError, match=r"scan 's1' of .*site-a\.zarr: writing the scan's metadata"):
        scan.run_stage(stage="ingest", config=Cfg(), outputs=[out])
    monkeypatch.undo()
    assert not scan.is_done("ingest")
    assert scan.run_stage(stage="ingest", config=Cfg(), outputs=[out]).chunks_present == 4


def test_a_full_disk_while_creating_a_store_leaves_nothing_that_blocks_the_next_ingest(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    enospc_on(monkeypatch, lambda key: key == "scans/zarr.json")
    with pytest.raises(StoreWriteError, match=r"site-a\.zarr: writing a new site store failed.*No space left"):
        SiteStore.open_or_create(data / "site-a.zarr", site_id="site-a")
    assert list(data.iterdir()) == []  # no half-created store, no temporary folder
    monkeypatch.undo()
    site = SiteStore.open_or_create(data / "site-a.zarr", site_id="site-a")
    write_stage(site)
    assert SiteStore.open(data / "site-a.zarr").scan_ids() == ["s1"]


def test_a_half_created_store_left_by_an_older_fedscan_is_repaired(tmp_path):
    path = tmp_path / "site-a.zarr"
    zarr.open_group(str(path), mode="w", zarr_format=3)  # the root written, its attributes not: the disk filled
    with pytest.raises(FedscanError):
        SiteStore.open(path)
    site = SiteStore.open_or_create(path, site_id="site-a")
    write_stage(site)
    assert site.scan_ids() == ["s1"]
    # a store with data is never "repaired"
    with pytest.raises(InvalidInputError, match="belongs to site 'site-a'"):
        SiteStore.open_or_create(path, site_id="site-b")


def test_metadata_documents_stay_valid_json(store):
    doc = json.loads((store / "scans" / "s1" / "zarr.json").read_text())
    assert set(doc["attributes"]["fedscan"]["provenance"]) == {"ingest"}


def test_a_corrupt_scan_document_does_not_block_ingesting_other_sources(store, tmp_path):
    from tasks.ingest import ingest

    (store / "scans" / "s1" / "zarr.json").write_text("{")
    src = tmp_path / "new.npy"
    np.save(src, np.random.default_rng(2).random((24, 2, 16)).astype("f4"))
    sidecar = IngestSidecar.model_validate(
        {"scan_id": "new", "geometry": {"beam": "parallel", "angular_range_deg": 180}}
    )
    res = ingest(src, site=SiteStore.open(store), sidecar=sidecar)
    assert res.scan_id == "new" and SiteStore.open(store, mode="r").scan("new").is_done("ingest")


def test_a_dropped_connection_while_writing_stays_retryable(tmp_path, monkeypatch):
    from tasks.errors import TransientError

    scan = SiteStore.create(tmp_path / "site-a.zarr", site_id="site-a").create_scan(manifest())
    real = zarr.storage.LocalStore.set

    async def reset(self, key, value):
        if "/c/" in key:
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
        return await real(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", reset)
    out = StageOutput("p", da.from_array(DATA, chunks=(4, 3, 8)), ("view", "row", "col"), (4, 3, 8))
    with pytest.raises(StoreWriteError, match=r"writing array 'p' failed.*Connection reset") as err:
        scan.run_stage(stage="ingest", config=Cfg(), outputs=[out])
    assert isinstance(err.value, TransientError)  # Prefect retries it, as it retried the bare ConnectionError


def test_verify_and_a_read_find_a_flipped_bit_in_an_fsspec_url_store():
    import uuid

    import fsspec

    url = f"memory://fedscan-verify-{uuid.uuid4().hex}/site-a.zarr"
    write_stage(SiteStore.create(url, site_id="site-a"))
    assert verify_store(url).ok and verify_store(url).chunks == 4
    fs, root = fsspec.core.url_to_fs(url)
    key = f"{root}/scans/s1/p/c/2/0/0"
    raw = bytearray(fs.cat_file(key))
    raw[len(raw) // 2] ^= 0x10
    fs.pipe_file(key, bytes(raw))
    assert [(p.scan, p.array, p.key) for p in verify_store(url).problems] == [("s1", "p", "c/2/0/0")]
    with pytest.raises(CorruptChunkError, match=rf"'c/2/0/0' of array 'p' in scan 's1' of {url}: checksum mismatch"):
        SiteStore.open(url, mode="r").scan("s1").read("p").compute()
