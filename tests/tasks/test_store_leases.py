"""One writer per (scan, stage), and stage records never lost: real processes against a real local store.

The writers are separate Python processes (``subprocess``), as two Prefect workers or a worker and an operator's
CLI would be; threads are used only where the store itself lives in one process (``memory://``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import zarr

from schemas.base import StageConfig
from schemas.geometry import Geometry, ReconGrid
from schemas.manifest import ScanManifest
from tasks.errors import LeaseHeldError, TransientError
from tasks.storage import SiteStore, verify_store

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

GEOM = Geometry(
    beam="parallel",
    n_views=32,
    n_detector_cols=16,
    n_detector_rows=2,
    detector_pitch_mm=1.0,
    grid=ReconGrid(nx_pixels=16, ny_pixels=16, pixel_size_mm=1.0),
)


class Cfg(StageConfig):
    scale: float = 2.0


def manifest(scan_id: str = "s1") -> ScanManifest:
    return ScanManifest(
        scan_id=scan_id, site_id="site-a", data_kind="line_integrals", geometry=GEOM, source_sha256="a" * 64
    )


def script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def spawn(path: Path, *args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(path), *map(str, args)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for(cond, timeout: float = 120.0, procs=()) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        for p in procs:
            assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


_WRITER = """
    import sys, time
    from pathlib import Path
    import dask, dask.array as da, numpy as np
    from schemas.base import StageConfig
    from tasks.errors import LeaseHeldError
    from tasks.storage import SiteStore, StageOutput

    class Cfg(StageConfig):
        scale: float = 2.0

    store, scale, hold = sys.argv[1], float(sys.argv[2]), sys.argv[3]

    def slow(block):
        while block.size and hold != "-" and not Path(hold).exists():  # the test says when this writer may go on
            time.sleep(0.01)
        return block * scale

    scan = SiteStore.open(store).scan("s1")
    data = da.ones((32, 2, 16), chunks=(4, 2, 16), dtype="f4").map_blocks(slow, dtype="f4")
    try:
        with dask.config.set(scheduler="synchronous"):
            res = scan.run_stage(
                stage="denoise", config=Cfg(scale=scale),
                outputs=[StageOutput("p", data, ("view", "row", "col"), (4, 2, 16))],
            )
    except LeaseHeldError as exc:
        print("refused:", exc)
        sys.exit(3)
    print("written", res.chunks_written)
"""


def test_two_runs_of_a_stage_with_different_configs_never_interleave(tmp_path):
    path = tmp_path / "site-a.zarr"
    SiteStore.create(path, site_id="site-a").create_scan(manifest())
    writer = script(tmp_path, "writer.py", _WRITER)
    release = tmp_path / "release"
    first = spawn(writer, path, 2.0, release)
    lock = path / ".locks" / "s1.denoise.lock"
    wait_for(lambda: lock.exists() and lock.stat().st_size > 0, procs=[first])  # the first holds the lease
    second = spawn(writer, path, 3.0, "-")
    out, err = second.communicate(timeout=120)
    release.touch()
    assert second.returncode == 3, (out, err)
    assert f"stage 'denoise' of scan 's1' in {path} is being written by another writer (pid {first.pid}" in out
    assert f"config {Cfg(scale=2.0).config_hash()}" in out and "refused" in out
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0 and "written 8" in out, err
    scan = SiteStore.open(path, mode="r").scan("s1")
    np.testing.assert_array_equal(scan.array("p")[...], 2.0)  # only the first writer's chunks
    assert scan.stage_record("denoise").config_hash == Cfg(scale=2.0).config_hash()
    assert verify_store(path).ok
    # once the first is done, the other config runs alone and recomputes every chunk
    again = subprocess.run(
        [sys.executable, str(writer), str(path), "3.0", "-"], env=ENV, capture_output=True, text=True
    )
    assert again.returncode == 0 and "written 8" in again.stdout, again.stderr
    np.testing.assert_array_equal(SiteStore.open(path, mode="r").scan("s1").array("p")[...], 3.0)


_INGEST = """
    import sys, time
    from pathlib import Path
    from schemas.ingest import IngestSidecar
    from tasks.errors import FedscanError
    from tasks.ingest import ingest
    from tasks.storage import SiteStore

    store, src, go = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    site = SiteStore.open(store)
    sidecar = IngestSidecar.model_validate(
        {"scan_id": "same-id", "geometry": {"beam": "parallel", "angular_range_deg": 180}}
    )
    while not go.exists():
        time.sleep(0.005)
    try:
        res = ingest(src, site=site, sidecar=sidecar)
    except FedscanError as exc:
        print("refused:", type(exc).__name__, exc)
        sys.exit(3)
    print("ingested", res.scan_id)
"""


@pytest.mark.slow
def test_two_sources_ingested_under_one_scan_id_at_once_one_is_refused(tmp_path):
    script_path = script(tmp_path, "ingest.py", _INGEST)
    rng = np.random.default_rng(1)
    for trial in range(2):
        path = tmp_path / f"site-a-{trial}.zarr"
        SiteStore.create(path, site_id="site-a")
        sources = []
        for k in range(2):
            src = tmp_path / f"src{trial}{k}.npy"
            np.save(src, (rng.random((360, 4, 256)) + k).astype("f4"))
            sources.append(src)
        go = tmp_path / f"go{trial}"
        procs = [spawn(script_path, path, src, go) for src in sources]
        time.sleep(4.0)  # both imported and waiting
        go.touch()
        results = [p.communicate(timeout=180) for p in procs]
        codes = [p.returncode for p in procs]
        assert sorted(codes) == [0, 3], results
        winner = codes.index(0)
        loser_out = results[1 - winner][0]
        assert "same-id" in loser_out and ("other source data" in loser_out or "LeaseHeldError" in loser_out)
        scan = SiteStore.open(path, mode="r").scan("same-id")
        np.testing.assert_array_equal(scan.array("projections")[...], np.load(sources[winner]))
        assert scan.is_done("ingest") and verify_store(path).ok


_RECORDS = """
    import sys, time
    from datetime import UTC, datetime
    from pathlib import Path
    from schemas.manifest import ProvenanceRecord
    from tasks.storage import SiteStore

    store, proc, n, go = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    scan = SiteStore.open(store).scan("s1")
    while not go.exists():
        time.sleep(0.005)
    for i in range(n):
        now = datetime.now(UTC)
        scan._write_record(ProvenanceRecord(
            stage=f"w{proc}-{i}", config={"i": i}, config_hash="0123456789abcdef", code_version="test",
            started_at=now, finished_at=now,
        ))
"""


@pytest.mark.slow
def test_400_concurrent_stage_record_writes_from_8_processes_none_lost(tmp_path):
    path = tmp_path / "site-a.zarr"
    SiteStore.create(path, site_id="site-a").create_scan(manifest())
    script_path = script(tmp_path, "records.py", _RECORDS)
    go = tmp_path / "go"
    procs = [spawn(script_path, path, p, 50, go) for p in range(8)]
    time.sleep(5.0)
    go.touch()
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    records = SiteStore.open(path, mode="r").scan("s1").provenance()
    assert len(records) == 400
    assert set(records) == {f"w{p}-{i}" for p in range(8) for i in range(50)}
    assert SiteStore.open(path, mode="r").scan("s1").manifest.scan_id == "s1"  # the manifest survived too


_HOLDER = """
    import sys, time
    from tasks.storage import SiteStore

    site = SiteStore.open(sys.argv[1])
    with site.lease("s1", "denoise"):
        print("held", flush=True)
        time.sleep(600)
"""


def test_a_lease_holder_killed_with_sigkill_does_not_block_the_next_writer(tmp_path):
    path = tmp_path / "site-a.zarr"
    site = SiteStore.create(path, site_id="site-a")
    holder = spawn(script(tmp_path, "holder.py", _HOLDER), path)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(LeaseHeldError, match=rf"pid {holder.pid} on "), site.lease("s1", "denoise"):
        pass
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    with site.lease("s1", "denoise"):  # the kernel released the flock
        pass


# ---- in-process stores (threads are the only other writers they can have) --------------------------
@pytest.fixture(params=["MemoryStore", "memory://"])
def memory_site(request) -> SiteStore:
    if request.param == "MemoryStore":
        return SiteStore.create(zarr.storage.MemoryStore(), site_id="site-a")
    return SiteStore.create(f"memory://fedscan-lease-{uuid.uuid4().hex}/site-a.zarr", site_id="site-a")


def test_memory_store_leases_refuse_a_second_writer_and_are_reentrant(memory_site):
    errors: list[BaseException] = []

    def other() -> None:
        try:
            with memory_site.lease("s1", "denoise"):
                pass
        except LeaseHeldError as exc:
            errors.append(exc)

    with memory_site.lease("s1", "denoise", config_hash="feedfacefeedface"):
        with memory_site.lease("s1", "denoise"):  # reentrant in the holder's own context
            pass
        t = threading.Thread(target=other)
        t.start()
        t.join()
        with memory_site.lease("s1", "surrogate"):  # another stage of the same scan is independent
            pass
    assert len(errors) == 1 and isinstance(errors[0], TransientError)
    assert "stage 'denoise' of scan 's1'" in str(errors[0]) and "config feedfacefeedface" in str(errors[0])
    with memory_site.lease("s1", "denoise"):  # released
        pass


def test_a_waiting_writer_gets_the_lease_when_the_holder_finishes(memory_site):
    held, got = threading.Event(), []

    def holder() -> None:
        with memory_site.lease("s1", "denoise"):
            held.set()
            time.sleep(0.3)

    t = threading.Thread(target=holder)
    t.start()
    held.wait()
    t0 = time.monotonic()
    with memory_site.lease("s1", "denoise", wait_s=30):
        got.append(time.monotonic() - t0)
    t.join()
    assert 0.1 < got[0] < 10
    refused: list[BaseException] = []

    def impatient() -> None:
        try:
            with memory_site.lease("s1", "x", wait_s=0.1):
                pass
        except LeaseHeldError as exc:
            refused.append(exc)

    with memory_site.lease("s1", "x"):
        t2 = threading.Thread(target=impatient)
        t2.start()
        t2.join()
    assert len(refused) == 1 and "refused after waiting 0.1 s" in str(refused[0])


def test_lease_names_are_validated(memory_site):
    for scan_id in ("", "../x", ".hidden", "a/b"):
        with pytest.raises(ValueError, match="not a valid scan id"):
            memory_site.lease(scan_id, "denoise")


# ---- S3: the same leases over a real S3 HTTP API (moto's server on loopback) --------------------------
# the moto server fixture ``s3_env`` lives in tests/conftest.py (the pipeline tests use it too)
@pytest.mark.slow
def test_s3_leases_refuse_a_second_writer_process_and_records_survive_concurrency(s3_env, tmp_path, monkeypatch):
    import s3fs

    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)
    bucket = f"fedscan-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
    url = f"s3://{bucket}/site-a.zarr"
    site = SiteStore.create(url, site_id="site-a")
    site.create_scan(manifest())
    env = {**ENV, **s3_env}
    writer = script(tmp_path, "writer.py", _WRITER)
    with site.lease("s1", "denoise", config_hash="feedfacefeedface"):
        refused = subprocess.run(
            [sys.executable, str(writer), url, "3.0", "-"], env=env, capture_output=True, text=True, timeout=180
        )
    assert refused.returncode == 3, refused.stderr
    assert f"stage 'denoise' of scan 's1' in {url}" in refused.stdout and "config feedfacefeedface" in refused.stdout
    assert f"(lease {url}/.locks/s1.denoise.lease)" in refused.stdout
    done = subprocess.run(
        [sys.executable, str(writer), url, "3.0", "-"], env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0 and "written 8" in done.stdout, done.stderr
    # concurrent record writes from 4 processes through the S3 API: none lost
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script(tmp_path, "records.py", _RECORDS)), url, str(p), "25", str(go)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for p in range(4)
    ]
    time.sleep(5.0)
    go.touch()
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    records = SiteStore.open(url, mode="r").scan("s1").provenance()
    assert {f"w{p}-{i}" for p in range(4) for i in range(25)} <= set(records) and "denoise" in records
    assert s3fs.S3FileSystem(skip_instance_cache=True).find(f"{bucket}/site-a.zarr/.locks") == []  # all released
