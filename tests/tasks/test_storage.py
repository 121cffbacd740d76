from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tasks.storage as storage
from schemas.base import StageConfig
from schemas.geometry import Geometry, ReconGrid
from schemas.manifest import ScanManifest
from tasks.errors import InvalidInputError, NotAFedscanStoreError, StoreNotFoundError
from tasks.storage import SiteStore, StageOutput, missing_chunks, projection_chunks, volume_chunks

GEOM = Geometry(
    beam="parallel",
    n_views=40,
    n_detector_cols=16,
    n_detector_rows=3,
    detector_pitch_mm=1.0,
    grid=ReconGrid(nx_pixels=16, ny_pixels=16, pixel_size_mm=1.0),
)


class Cfg(StageConfig):
    scale: float = 2.0


def manifest(scan_id: str = "s1", site: str = "site-a", sha: str = "a" * 64) -> ScanManifest:
    return ScanManifest(scan_id=scan_id, site_id=site, data_kind="line_integrals", geometry=GEOM, source_sha256=sha)


@pytest.fixture(params=["memory", "local", "memory-url", "s3"])
def site(request, tmp_path) -> SiteStore:
    """The same site store over a zarr MemoryStore, a local folder, an fsspec ``memory://`` URL and S3 (moto's
    server on 127.0.0.1)."""
    if request.param == "memory":
        store: zarr.storage.MemoryStore | Path | str = zarr.storage.MemoryStore()
    elif request.param == "local":
        store = tmp_path / "site-a.zarr"
    elif request.param == "memory-url":
        store = f"memory://fedscan-{uuid.uuid4().hex[:8]}/site-a.zarr"
    else:
        store = request.getfixturevalue("s3_bucket") + "/site-a.zarr"
    return SiteStore.create(store, site_id="site-a")


# ---- round trips ---------------------------------------------------------------------------------
@st.composite
def shapes_and_chunks(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.integers(1, 13)) for _ in range(ndim))
    chunks = tuple(draw(st.integers(1, s)) for s in shape)  # uneven last chunks when s % c != 0
    src_chunks = tuple(draw(st.integers(1, s)) for s in shape)  # source chunking unrelated to the target's
    return shape, chunks, src_chunks


@given(spec=shapes_and_chunks(), kind=st.sampled_from(["memory", "local"]), dtype=st.sampled_from(["f4", "u2", "i4"]))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_stage_write_round_trips_any_shape_and_chunking(spec, kind, dtype, tmp_path_factory):
    shape, chunks, src_chunks = spec
    store = zarr.storage.MemoryStore() if kind == "memory" else tmp_path_factory.mktemp("rt") / "s.zarr"
    site = SiteStore.create(store, site_id="site-a")
    scan = site.create_scan(manifest())
    data = (np.random.default_rng(len(shape)).random(shape) * 1000).astype(dtype)
    dims = tuple(f"d{i}" for i in range(len(shape)))
    res = scan.run_stage(
        stage="ingest", config=Cfg(), outputs=[StageOutput("x", da.from_array(data, chunks=src_chunks), dims, chunks)]
    )
    arr = SiteStore.open(store).scan("s1").array("x")
    np.testing.assert_array_equal(arr[...], data)
    assert arr.dtype == np.dtype(dtype)
    assert tuple(arr.chunks) == chunks
    assert tuple(arr.metadata.dimension_names) == dims
    assert res.chunks_written == arr.nchunks
    assert missing_chunks(arr) == 0


def test_stage_skips_same_config_and_recomputes_changed_config(site):
    scan = site.create_scan(manifest())
    x = da.ones((40, 3, 16), chunks=(8, 3, 16), dtype="f4")
    out = lambda cfg: [StageOutput("p", x * cfg.scale, ("view", "row", "col"))]
    first = scan.run_stage(stage="denoise", config=Cfg(), outputs=out(Cfg()))
    assert not first.skipped and first.chunks_written > 0
    again = scan.run_stage(stage="denoise", config=Cfg(), outputs=out(Cfg()))
    assert again.skipped and again.record == first.record
    assert scan.is_done("denoise", Cfg().config_hash())
    changed = scan.run_stage(stage="denoise", config=Cfg(scale=3.0), outputs=out(Cfg(scale=3.0)))
    assert not changed.skipped and changed.chunks_written == first.chunks_written
    np.testing.assert_array_equal(scan.array("p")[...], 3.0)
    assert scan.stage_record("denoise").config_hash == Cfg(scale=3.0).config_hash()
    # changed inputs (an upstream stage recomputed) also recompute
    moved = scan.run_stage(
        stage="denoise", config=Cfg(scale=3.0), outputs=out(Cfg(scale=3.0)), inputs={"ingest": "f" * 16}
    )
    assert not moved.skipped


def test_chunking_follows_access_pattern():
    v, r, c = projection_chunks((1440, 512, 768))
    assert v == 32 and c == 768 and 1 <= r <= 512
    assert 2**20 <= v * r * c * 4 <= 16 * 2**20
    s, y, x = volume_chunks((512, 512, 512))
    assert (y, x) == (512, 512) and 2**20 <= s * y * x * 4 <= 16 * 2**20
    assert projection_chunks((5, 2, 3)) == (5, 2, 3)


# ---- faults ----------------------------------------------------------------------------------------
def test_fault_inside_write_loop_keeps_written_chunks_and_rerun_finishes_bit_exactly(site, monkeypatch):
    scan = site.create_scan(manifest())
    rng = np.random.default_rng(7)
    data = rng.standard_normal((40, 3, 16)).astype("f4")
    src = da.from_array(data, chunks=(5, 3, 16))
    outputs = [StageOutput("p", src, ("view", "row", "col"), (4, 3, 16))]
    real = storage._write_block
    calls = {"n": 0}

    def flaky(target, block, region):
        calls["n"] += 1
        if calls["n"] > 4:
            raise OSError(28, "No space left on device")
        return real(target, block, region)

    monkeypatch.setattr(storage, "_write_block", flaky)
    with dask.config.set(scheduler="synchronous"), pytest.raises(OSError, match="No space left"):
        scan.run_stage(stage="ingest", config=Cfg(), outputs=outputs)
    arr = scan.array("p")
    assert missing_chunks(arr) == arr.nchunks - 4
    assert scan.stage_record("ingest") is None  # not done: no provenance before the last chunk
    # every chunk written before the fault is intact
    written = [i for i in range(arr.nchunks) if not np.isnan(arr[i * 4, 0, 0])]
    assert len(written) == 4
    for i in written:
        np.testing.assert_array_equal(arr[i * 4 : (i + 1) * 4], data[i * 4 : (i + 1) * 4])

    monkeypatch.setattr(storage, "_write_block", real)
    res = scan.run_stage(stage="ingest", config=Cfg(), outputs=outputs)
    assert (res.chunks_written, res.chunks_present) == (arr.nchunks - 4, 4)
    np.testing.assert_array_equal(scan.array("p")[...], data)
    assert scan.is_done("ingest", Cfg().config_hash())


_KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import dask, dask.array as da, numpy as np
    from schemas.base import StageConfig
    from tasks.storage import SiteStore, StageOutput

    class Cfg(StageConfig):
        scale: float = 2.0

    def slow(block):
        time.sleep(float(sys.argv[2]))
        return block * 2.0

    site = SiteStore.open(sys.argv[1])
    scan = site.scan("s1")
    rng = np.random.default_rng(11)
    data = da.from_array(rng.standard_normal((48, 4, 32)).astype("f4"), chunks=(4, 4, 32))
    out = data.map_blocks(slow, dtype="f4")
    with dask.config.set(scheduler="synchronous"):
        res = scan.run_stage(stage="denoise", config=Cfg(), outputs=[StageOutput("p", out, ("view", "row", "col"), (4, 4, 32))])
    print("written", res.chunks_written, "present", res.chunks_present)
    """
)


@pytest.mark.slow
def test_killed_writer_process_leaves_valid_chunks_and_rerun_completes(tmp_path):
    path = tmp_path / "site-a.zarr"
    site = SiteStore.create(path, site_id="site-a")
    site.create_scan(manifest())
    script = tmp_path / "writer.py"
    script.write_text(_KILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(path), "0.25"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    chunk_dir = path / "scans" / "s1" / "p" / "c"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if chunk_dir.exists() and sum(1 for f in chunk_dir.rglob("*") if f.is_file()) >= 4:
            break
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    scan = SiteStore.open(path).scan("s1")
    arr = scan.array("p")
    left = missing_chunks(arr)
    assert 0 < left < arr.nchunks, "the kill should land half-way"
    assert scan.stage_record("denoise") is None
    reference = np.random.default_rng(11).standard_normal((48, 4, 32)).astype("f4") * 2.0
    for i in range(arr.nchunks):  # every chunk that exists is whole and correct
        block = arr[i * 4 : (i + 1) * 4]
        if not np.isnan(block).all():
            np.testing.assert_array_equal(block, reference[i * 4 : (i + 1) * 4])
    rerun = subprocess.run(
        [sys.executable, str(script), str(path), "0"], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    assert f"written {left} present {arr.nchunks - left}" in rerun.stdout
    np.testing.assert_array_equal(SiteStore.open(path).scan("s1").array("p")[...], reference)


# ---- opening -----------------------------------------------------------------------------------------
def test_open_refuses_missing_and_foreign_paths(tmp_path):
    with pytest.raises(StoreNotFoundError, match="no store at"):
        SiteStore.open(tmp_path / "nope.zarr")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("hello")
    with pytest.raises(NotAFedscanStoreError, match="not a fedscan site store"):
        SiteStore.open(plain)
    foreign = tmp_path / "foreign.zarr"
    zarr.open_group(str(foreign), mode="w").attrs["other"] = 1
    with pytest.raises(NotAFedscanStoreError, match="Zarr group but not a fedscan"):
        SiteStore.open(foreign)
    with pytest.raises(NotAFedscanStoreError, match="not empty"):
        SiteStore.create(plain, site_id="x")
    assert isinstance(NotAFedscanStoreError("x"), ValueError)
    assert isinstance(StoreNotFoundError("x"), FileNotFoundError)


def test_scan_lookup_errors_name_the_store_and_scan(site):
    with pytest.raises(StoreNotFoundError, match="no scan 'missing'"):
        site.scan("missing")
    scan = site.create_scan(manifest())
    with pytest.raises(StoreNotFoundError, match="has no array 'volume'"):
        scan.array("volume")
    with pytest.raises(InvalidInputError, match="other source data"):
        site.create_scan(manifest(sha="b" * 64))
    with pytest.raises(InvalidInputError, match="is for site"):
        site.create_scan(manifest(scan_id="s2", site="site-b"))


def test_open_or_create_checks_site(tmp_path):
    p = tmp_path / "x.zarr"
    a = SiteStore.open_or_create(p, site_id="x")
    b = SiteStore.open_or_create(p, site_id="x")
    assert a.site_id == b.site_id == "x"
    with pytest.raises(InvalidInputError, match="belongs to site 'x'"):
        SiteStore.open_or_create(p, site_id="y")


def test_fsspec_url_store_round_trip_and_resume(monkeypatch):
    import uuid

    url = f"memory://fedscan-test-{uuid.uuid4().hex}/site-a.zarr"
    site = SiteStore.create(url, site_id="site-a")
    scan = site.create_scan(manifest())
    data = np.arange(40 * 3 * 16, dtype="f4").reshape(40, 3, 16)
    outputs = [StageOutput("p", da.from_array(data, chunks=(8, 3, 16)), ("view", "row", "col"), (8, 3, 16))]
    real, calls = storage._write_block, {"n": 0}

    def flaky(*a):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("connection reset by object store")
        return real(*a)

    monkeypatch.setattr(storage, "_write_block", flaky)
    with dask.config.set(scheduler="synchronous"), pytest.raises(OSError):
        scan.run_stage(stage="ingest", config=Cfg(), outputs=outputs)
    monkeypatch.setattr(storage, "_write_block", real)
    res = SiteStore.open(url).scan("s1").run_stage(stage="ingest", config=Cfg(), outputs=outputs)
    assert (res.chunks_written, res.chunks_present) == (3, 2)
    np.testing.assert_array_equal(SiteStore.open(url, mode="r").scan("s1").array("p")[...], data)


@pytest.mark.parametrize("scheduler", ["threads", "distributed"])
def test_write_missing_chunks_reports_progress_from_the_chunks_on_disk(tmp_path, scheduler, monkeypatch):
    import dask.array as da
    import zarr

    from tasks.storage import write_missing_chunks

    monkeypatch.setattr(storage, "PROGRESS_POLL_S", 0.02)
    target = zarr.open_array(str(tmp_path / "a.zarr"), mode="w", shape=(12, 4), chunks=(2, 4), dtype="f4")
    target[:4] = 1.0  # two chunks already there: not counted

    def slow(block: np.ndarray) -> np.ndarray:
        time.sleep(0.3)
        return block

    source = da.arange(48, dtype="f4").reshape(12, 4).rechunk((2, 4)).map_blocks(slow, dtype="f4")
    seen: list[tuple[int, int]] = []

    def progress(done: int, total: int) -> None:
        seen.append((done, total))

    if scheduler == "distributed":
        from dask.distributed import Client, LocalCluster

        with (
            LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster,
            Client(cluster),
        ):
            report = write_missing_chunks(target, source, progress=progress)
    else:
        with dask.config.set(scheduler="threads", num_workers=1):
            report = write_missing_chunks(target, source, progress=progress)
    assert (report.written, report.skipped) == (4, 2)
    assert seen[-1] == (4, 4)
    assert {total for _, total in seen} == {4}
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)  # never goes back
    assert any(d < 4 for d, _ in seen), seen  # reported while the chunks were being written
    np.testing.assert_array_equal(target[4:], np.arange(16, 48, dtype="f4").reshape(8, 4))


def test_write_missing_chunks_reports_no_completion_when_a_chunk_fails(tmp_path):
    import dask.array as da
    import zarr

    from tasks.storage import write_missing_chunks

    target = zarr.open_array(str(tmp_path / "b.zarr"), mode="w", shape=(4, 4), chunks=(2, 4), dtype="f4")

    def broken(block: np.ndarray, block_info: dict | None = None) -> np.ndarray:
        if block_info and block_info[None]["chunk-location"][0] == 1:
            raise RuntimeError("chunk 1 is bad")
        return block

    source = da.zeros((4, 4), chunks=(2, 4), dtype="f4").map_blocks(broken, dtype="f4")
    seen: list[tuple[int, int]] = []
    with pytest.raises(RuntimeError, match="chunk 1 is bad"):
        write_missing_chunks(target, source, progress=lambda d, t: seen.append((d, t)))
    assert (2, 2) not in seen
