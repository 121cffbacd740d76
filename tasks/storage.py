"""The one module that touches Zarr: site stores, scan groups, resumable chunk writes, provenance.

Layout of one site store (Zarr v3; a local folder or any fsspec URL)::

    <site>.zarr/                          attrs: {"fedscan": {"kind", "format_version", "site_id"}}
      scans/<scan_id>/                    attrs: {"fedscan": {"manifest": {...}, "provenance": {stage: {...}}}}
        projections            (view, row, col)  float32 line integrals
        counts                 (view, row, col)  raw detector counts (when the scanner gave counts)
        projections_denoised   (view, row, col)  float32
        volume                 (slice, y, x)     float32
        ...

A stage writes its outputs chunk by chunk. Arrays are written with ``write_empty_chunks=True`` and a NaN
fill value, so a chunk's key exists exactly when that chunk was written (zarr writes each chunk
atomically: a killed writer leaves whole chunks or none). A stage counts as done only when its
provenance record is written, after the last chunk. A rerun with the same config hash and inputs skips
the stage; a rerun after a fault writes only the missing chunks; a changed config recomputes.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import dask
import dask.array as da
import numpy as np
import zarr
import zarr.errors
from pydantic import ValidationError
from zarr.abc.store import Store
from zarr.codecs import BloscCodec, BloscShuffle

from schemas.base import StageConfig
from schemas.ids import IdKind, validate_id
from schemas.manifest import ProvenanceRecord, ScanManifest
from tasks.errors import (
    InvalidInputError,
    NotAFedscanStoreError,
    StageIncompleteError,
    StoreNotFoundError,
)
from tasks.extras import require_store_protocol

STORE_KIND = "fedscan-site-store"
_CREATE_LOCK = threading.Lock()
FORMAT_VERSION = 1
SCANS = "scans"

#: Target bytes per chunk: >= 1 MB (field notes) and small enough that a task's working set stays in cache
#: and memory: a few MB.
TARGET_CHUNK_BYTES = 8 * 2**20


def default_compressors() -> tuple[BloscCodec, ...]:
    """Compressor for every fedscan array: Blosc-Zstd level 1 with bit shuffle.

    Chosen by ``benchmarks/storage.py`` (simulated noisy line integrals, uint16 counts, float32 volumes):
    it compressed 1.30x / 1.71x / 1.44x, read as fast as no compression and wrote at 0.5-0.65x its speed;
    LZ4 was no faster and compressed less, zstd-5 and gzip cost 2-20x more write time for a few percent.
    """
    return (BloscCodec(cname="zstd", clevel=1, shuffle=BloscShuffle.bitshuffle),)


# ------------------------------------------------------------------------------------------------
# Chunking chosen for the access pattern
# ------------------------------------------------------------------------------------------------
def projection_chunks(shape: Sequence[int], *, itemsize: int = 4, views_per_chunk: int = 32) -> tuple[int, ...]:
    """Chunks for ``(views, rows, cols)``: runs of whole views (denoising walks along views), rows split
    so a chunk stays near :data:`TARGET_CHUNK_BYTES`; the reconstruction rechunks to row blocks."""
    views, rows, cols = (int(s) for s in shape)
    v = max(1, min(views, views_per_chunk))
    per_row = v * cols * itemsize
    r = max(1, min(rows, TARGET_CHUNK_BYTES // max(per_row, 1)))
    if r >= 8 and r < rows:
        r -= r % 8
    return (v, r, max(1, cols))


def volume_chunks(shape: Sequence[int], *, itemsize: int = 4) -> tuple[int, ...]:
    """Chunks for ``(slices, y, x)``: blocks of whole slices near :data:`TARGET_CHUNK_BYTES`."""
    slices, ny, nx = (int(s) for s in shape)
    per_slice = max(ny * nx * itemsize, 1)
    s = max(1, min(slices, TARGET_CHUNK_BYTES // per_slice))
    return (s, max(1, ny), max(1, nx))


def default_chunks(dimension_names: Sequence[str], shape: Sequence[int], itemsize: int) -> tuple[int, ...]:
    """Chunking for an array by its dimension names (``view`` first → projections, ``slice`` → volumes)."""
    dims = tuple(dimension_names)
    if len(dims) == 3 and dims[0] == "view":
        return projection_chunks(shape, itemsize=itemsize)
    if len(dims) == 3 and dims[0] == "slice":
        return volume_chunks(shape, itemsize=itemsize)
    # 1-D / other small arrays (labels, per-slice metrics): one chunk up to the target size.
    n = max(1, math.prod(int(s) for s in shape[1:]) * itemsize)
    first = max(1, min(int(shape[0]) if shape else 1, TARGET_CHUNK_BYTES // n))
    return (first, *(max(1, int(s)) for s in shape[1:]))


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------
StoreLike = str | Path | Store


def _describe(store: StoreLike) -> str:
    return str(store)


def _utcnow() -> datetime:
    return datetime.now(UTC)


@lru_cache(maxsize=1)
def code_version() -> str:
    """fedscan's version, plus the git commit when running from a checkout."""
    try:
        version = metadata.version("fedscan")
    except metadata.PackageNotFoundError:
        version = "0+unknown"
    here = Path(__file__).resolve().parent
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        if out.returncode == 0 and out.stdout.strip():
            return f"{version}+g{out.stdout.strip()}"
    return version


def _run_sync(coro: Any) -> Any:
    from zarr.core.sync import sync

    return sync(coro)


def present_chunk_keys(array: zarr.Array) -> set[str]:
    """Keys (relative to the array) of every chunk that exists in the store."""
    prefix = f"{array.path}/" if array.path else ""

    async def _collect() -> set[str]:
        return {k[len(prefix) :] async for k in array.store.list_prefix(prefix)}

    keys: set[str] = _run_sync(_collect())
    return keys


def chunk_regions(shape: Sequence[int], chunks: Sequence[int]) -> Iterator[tuple[tuple[int, ...], tuple[slice, ...]]]:
    """Every chunk index of a regular grid with the region of the array it covers."""
    grid = [max(1, math.ceil(s / c)) if s else 0 for s, c in zip(shape, chunks, strict=True)]
    for idx in np.ndindex(*grid):
        region = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(idx, chunks, shape, strict=True))
        yield tuple(int(i) for i in idx), region


def _write_block(target: zarr.Array, block: np.ndarray, region: tuple[slice, ...]) -> int:
    """Write one chunk. Module level so tests can inject a fault into the write loop."""
    target[region] = block
    return 1


@dataclass(frozen=True)
class WriteReport:
    """How many chunks a write computed and how many it found already present."""

    written: int
    skipped: int

    @property
    def total(self) -> int:
        return self.written + self.skipped


#: ``progress(done, total)``: chunks written so far and chunks to write in this call.
ProgressFn = Callable[[int, int], None]


#: How often a write with a progress callback counts the chunks on disk, seconds.
PROGRESS_POLL_S = 0.5


def _compute_writes(target: zarr.Array, todo: list[Any], progress: ProgressFn | None, *, present: int) -> None:
    """``dask.compute(*todo)`` (any scheduler, unchanged semantics), with ``progress`` fed by a watcher thread
    that counts the chunks on disk every :data:`PROGRESS_POLL_S` (``present`` of them were there before)."""
    if progress is None:
        dask.compute(*todo)
        return
    total, stop = len(todo), threading.Event()

    def watch() -> None:
        last = 0
        while not stop.wait(PROGRESS_POLL_S):
            done = min(total, max(0, len(present_chunk_keys(target)) - present))
            if done > last:
                last = done
                progress(done, total)

    watcher = threading.Thread(  # in the caller's context: the callback may talk to the caller's run
        target=contextvars.copy_context().run, args=(watch,), name="fedscan-write-progress", daemon=True
    )
    watcher.start()
    try:
        dask.compute(*todo)
    finally:
        stop.set()
        watcher.join()
    progress(total, total)


def _output_progress(progress: Callable[[float], None], k: int, n_outputs: int, done: int, total: int) -> None:
    """Chunks of output ``k`` (of ``n_outputs``) to the fraction of the whole stage."""
    progress((k + done / total) / n_outputs)


def write_missing_chunks(target: zarr.Array, source: da.Array, *, progress: ProgressFn | None = None) -> WriteReport:
    """Compute and write only the chunks of ``target`` that are not yet in the store.

    ``source`` is rechunked to ``target``'s chunk grid, so each task writes whole chunks and no two
    tasks touch the same chunk. Runs on the current dask scheduler (a ``distributed.Client`` when one
    is active). A fault part-way leaves every finished chunk in place; calling again finishes the rest.
    ``progress(done, total)`` is called as chunks land on disk, and once with ``done == total`` at the end
    (``total`` counts this call's chunks only).
    """
    if tuple(source.shape) != tuple(target.shape):
        raise InvalidInputError(
            f"cannot write an array of shape {source.shape} into {target.path!r} of shape {target.shape}"
        )
    chunks = tuple(int(c) for c in target.chunks)
    source = source.astype(target.dtype, copy=False).rechunk(chunks)
    present = present_chunk_keys(target)
    writer = target.with_config({"write_empty_chunks": True})
    blocks = source.to_delayed(optimize_graph=True)
    todo = []
    skipped = 0
    for idx, region in chunk_regions(target.shape, chunks):
        if target.metadata.encode_chunk_key(idx) in present:
            skipped += 1
            continue
        todo.append(dask.delayed(_write_block, pure=False)(writer, blocks[idx], region))
    if todo:
        _compute_writes(target, todo, progress, present=len(present))
    return WriteReport(written=len(todo), skipped=skipped)


def missing_chunks(array: zarr.Array) -> int:
    """How many chunks of ``array`` have not been written."""
    present = present_chunk_keys(array)
    return sum(
        1 for idx, _ in chunk_regions(array.shape, array.chunks) if array.metadata.encode_chunk_key(idx) not in present
    )


# ------------------------------------------------------------------------------------------------
# Stage outputs and results
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StageOutput:
    """One array a stage writes: its lazy data and how to lay it out."""

    name: str
    data: da.Array
    dimension_names: tuple[str, ...]
    chunks: tuple[int, ...] | None = None
    attributes: Mapping[str, Any] = field(default_factory=dict)
    fill_value: Any = None  # None: NaN for floats, 0 for integers


@dataclass(frozen=True)
class StageResult:
    """What :meth:`ScanStore.run_stage` did."""

    record: ProvenanceRecord
    skipped: bool
    chunks_written: int
    chunks_present: int


#: ``metrics(scan, seconds)``: extra provenance metrics, computed after the last chunk was written.
MetricsFn = Callable[["ScanStore", float], Mapping[str, float | int | str | bool | None]]


# ------------------------------------------------------------------------------------------------
# Scan
# ------------------------------------------------------------------------------------------------
class ScanStore:
    """One scan's group inside a site store."""

    def __init__(self, site: SiteStore, group: zarr.Group, scan_id: str) -> None:
        self.site = site
        self.group = group
        self.scan_id = scan_id

    def __repr__(self) -> str:
        return f"ScanStore({self.site.uri!r}, scan_id={self.scan_id!r})"

    # ---- metadata ---------------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        meta = self.group.attrs.get("fedscan", {})
        return dict(meta) if isinstance(meta, Mapping) else {}

    def _set_meta(self, meta: Mapping[str, Any]) -> None:
        self.group.update_attributes({"fedscan": dict(meta)})

    @property
    def manifest(self) -> ScanManifest:
        raw = self._meta().get("manifest")
        if raw is None:
            raise StoreNotFoundError(f"scan {self.scan_id!r} in {self.site.uri} has no manifest")
        try:
            return ScanManifest.model_validate(raw)
        except ValidationError as exc:
            raise InvalidInputError(
                f"scan {self.scan_id!r} in {self.site.uri} has an invalid manifest: {exc.errors()[0]['msg']}"
            ) from exc

    def provenance(self) -> dict[str, ProvenanceRecord]:
        """Every completed stage's record, by stage name."""
        raw = self._meta().get("provenance", {})
        return {stage: ProvenanceRecord.model_validate(rec) for stage, rec in dict(raw).items()}

    def stage_record(self, stage: str) -> ProvenanceRecord | None:
        return self.provenance().get(stage)

    def is_done(self, stage: str, config_hash: str | None = None, inputs: Mapping[str, str] | None = None) -> bool:
        """True when ``stage`` completed (with this config hash and these inputs, when given)."""
        rec = self.stage_record(stage)
        if rec is None:
            return False
        if config_hash is not None and rec.config_hash != config_hash:
            return False
        if inputs is not None and dict(rec.inputs) != dict(inputs):
            return False
        return all(name in self.array_names() for name in rec.outputs)

    def _write_record(self, record: ProvenanceRecord) -> None:
        meta = self._meta()
        prov = dict(meta.get("provenance", {}))
        prov[record.stage] = record.model_dump(mode="json")
        meta["provenance"] = prov
        self._set_meta(meta)

    def _drop_record(self, stage: str) -> None:
        meta = self._meta()
        prov = dict(meta.get("provenance", {}))
        if stage in prov:
            del prov[stage]
            meta["provenance"] = prov
            self._set_meta(meta)

    # ---- arrays -----------------------------------------------------------------------------
    def array_names(self) -> list[str]:
        return sorted(name for name, _ in self.group.arrays())

    def array(self, name: str) -> zarr.Array:
        try:
            node = self.group[name]
        except KeyError as exc:
            raise StoreNotFoundError(
                f"scan {self.scan_id!r} in {self.site.uri} has no array {name!r} "
                f"(it has: {', '.join(self.array_names()) or 'none'})"
            ) from exc
        if not isinstance(node, zarr.Array):
            raise StoreNotFoundError(f"{name!r} in scan {self.scan_id!r} is not an array")
        return node

    def read(self, name: str, *, chunks: Any = None) -> da.Array:
        """A lazy dask view of an array (by default chunked as stored)."""
        arr = self.array(name)
        return da.from_zarr(arr, chunks=chunks if chunks is not None else arr.chunks)

    def prepare_output(
        self,
        name: str,
        *,
        shape: Sequence[int],
        dtype: Any,
        dimension_names: Sequence[str],
        chunks: Sequence[int] | None,
        writing: Mapping[str, Any],
        attributes: Mapping[str, Any] | None = None,
        fill_value: Any = None,
    ) -> zarr.Array:
        """The array a stage writes into: reused when an interrupted write of the same work left it,
        created afresh otherwise (a different config, shape or dtype replaces it)."""
        shape = tuple(int(s) for s in shape)
        dtype = np.dtype(dtype)
        chunks = tuple(chunks) if chunks is not None else default_chunks(dimension_names, shape, dtype.itemsize)
        if name in self.array_names():
            existing = self.array(name)
            marker = existing.attrs.get("fedscan", {})
            same = (
                tuple(existing.shape) == shape
                and existing.dtype == dtype
                and tuple(existing.chunks) == tuple(chunks)
                and isinstance(marker, Mapping)
                and marker.get("writing") == dict(writing)
            )
            if same:
                return existing
        if fill_value is None:
            fill_value = np.nan if np.issubdtype(dtype, np.floating) else 0
        attrs = dict(attributes or {})
        attrs["fedscan"] = {"writing": dict(writing)}
        return self.group.create_array(
            name,
            shape=shape,
            chunks=chunks,
            dtype=dtype,
            fill_value=fill_value,
            compressors=default_compressors(),
            dimension_names=tuple(dimension_names),
            attributes=attrs,
            overwrite=True,
        )

    # ---- stages -----------------------------------------------------------------------------
    def run_stage(
        self,
        *,
        stage: str,
        config: StageConfig,
        outputs: Sequence[StageOutput],
        inputs: Mapping[str, str] | None = None,
        metrics: MetricsFn | None = None,
        force: bool = False,
        progress: Callable[[float], None] | None = None,
    ) -> StageResult:
        """Write a stage's outputs chunk by chunk, then its provenance record.

        Skips the stage when it is already done with the same config hash and inputs (unless
        ``force``); resumes an interrupted write of the same work; recomputes otherwise.
        ``progress(fraction)`` is called as chunks are written (0 < fraction ≤ 1, over all outputs).
        """
        config_hash = config.config_hash()
        inputs = dict(inputs or {})
        if not force and self.is_done(stage, config_hash, inputs):
            rec = self.stage_record(stage)
            assert rec is not None
            return StageResult(record=rec, skipped=True, chunks_written=0, chunks_present=0)
        # The old record no longer describes what is (about to be) on disk.
        self._drop_record(stage)
        writing = {"stage": stage, "config_hash": config_hash, "inputs": inputs}
        started = _utcnow()
        t0 = time.perf_counter()
        written = present = 0
        for k, out in enumerate(outputs):
            target = self.prepare_output(
                out.name,
                shape=out.data.shape,
                dtype=out.data.dtype,
                dimension_names=out.dimension_names,
                chunks=out.chunks,
                writing=writing,
                attributes=out.attributes,
                fill_value=out.fill_value,
            )
            part = None if progress is None else functools.partial(_output_progress, progress, k, len(outputs))

            report = write_missing_chunks(target, out.data, progress=part)
            written += report.written
            present += report.skipped
            left = missing_chunks(target)
            if left:
                raise StageIncompleteError(
                    f"stage {stage!r} of scan {self.scan_id!r}: {left} chunks of {out.name!r} missing after write"
                )
        elapsed = time.perf_counter() - t0
        extra: dict[str, float | int | str | bool | None] = {
            "seconds": round(elapsed, 4),
            "chunks_written": written,
            "chunks_resumed": present,
        }
        if metrics is not None:
            extra.update(metrics(self, elapsed))
        record = ProvenanceRecord(
            stage=stage,
            config=config.model_dump(mode="json"),
            config_hash=config_hash,
            inputs=inputs,
            outputs=tuple(o.name for o in outputs),
            code_version=code_version(),
            started_at=started,
            finished_at=_utcnow(),
            metrics=extra,
        )
        self._write_record(record)
        return StageResult(record=record, skipped=False, chunks_written=written, chunks_present=present)


# ------------------------------------------------------------------------------------------------
# Site
# ------------------------------------------------------------------------------------------------
def _open_group(store: StoreLike, mode: Literal["r", "r+", "w-"]) -> zarr.Group:
    require_store_protocol(store)  # a missing optional extra (s3fs) is one line naming it, not a traceback
    if isinstance(store, Path):
        store = str(store)
    return zarr.open_group(store=store, mode=mode, zarr_format=3)


def _is_local_path(store: StoreLike) -> Path | None:
    if isinstance(store, Path):
        return store
    if isinstance(store, str) and "://" not in store:
        return Path(store)
    if isinstance(store, str) and store.startswith("file://"):
        return Path(store[len("file://") :])
    return None


class SiteStore:
    """One site's Zarr store: a ``scans`` group holding one group per scan."""

    def __init__(self, root: zarr.Group, uri: str) -> None:
        self.root = root
        self.uri = uri

    def __repr__(self) -> str:
        return f"SiteStore({self.uri!r}, site_id={self.site_id!r})"

    # ---- opening ----------------------------------------------------------------------------
    @classmethod
    def create(cls, store: StoreLike, *, site_id: str) -> SiteStore:
        """Create a new, empty site store; refuses a path that already holds anything."""
        local = _is_local_path(store)
        if local is not None and local.exists() and (local.is_file() or any(local.iterdir())):
            raise NotAFedscanStoreError(f"{local} already exists and is not empty; refusing to create a store there")
        try:
            root = _open_group(store, mode="w-")
        except (FileExistsError, zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError) as exc:
            raise NotAFedscanStoreError(f"{_describe(store)} already holds Zarr data") from exc
        root.update_attributes({"fedscan": {"kind": STORE_KIND, "format_version": FORMAT_VERSION, "site_id": site_id}})
        root.require_group(SCANS)
        return cls(root, _describe(store))

    @classmethod
    def open(cls, store: StoreLike, *, mode: Literal["r", "r+"] = "r+") -> SiteStore:
        """Open an existing site store; a missing path or a non-fedscan path is a clear error."""
        local = _is_local_path(store)
        if local is not None and not local.exists():
            raise StoreNotFoundError(f"no store at {local}")
        try:
            root = _open_group(store, mode=mode)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError, ValueError) as exc:
            raise NotAFedscanStoreError(f"{_describe(store)} is not a fedscan site store (no Zarr v3 group)") from exc
        meta = root.attrs.get("fedscan")
        if not isinstance(meta, Mapping) or meta.get("kind") != STORE_KIND:
            raise NotAFedscanStoreError(f"{_describe(store)} is a Zarr group but not a fedscan site store")
        version = meta.get("format_version", -1)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise NotAFedscanStoreError(
                f"{_describe(store)} has store format {meta.get('format_version')}; "
                f"this fedscan reads up to {FORMAT_VERSION}"
            )
        return cls(root, _describe(store))

    @classmethod
    def open_or_create(cls, store: StoreLike, *, site_id: str) -> SiteStore:
        """Open the store when it exists (checking it belongs to ``site_id``), else create it."""
        with _CREATE_LOCK:  # concurrent ingest tasks of one site in one process must not race here
            local = _is_local_path(store)
            exists = local.exists() if local is not None else _has_group(store)
            if not exists:
                return cls.create(store, site_id=site_id)
            site = cls.open(store)
        if site.site_id != site_id:
            raise InvalidInputError(f"{site.uri} belongs to site {site.site_id!r}, not {site_id!r}")
        return site

    # ---- contents ---------------------------------------------------------------------------
    @property
    def site_id(self) -> str:
        meta = self.root.attrs.get("fedscan")
        assert isinstance(meta, Mapping)
        return str(meta["site_id"])

    def _scans(self) -> zarr.Group:
        node = self.root.get(SCANS)
        if not isinstance(node, zarr.Group):
            raise NotAFedscanStoreError(f"{self.uri} has no '{SCANS}' group")
        return node

    def scan_ids(self) -> list[str]:
        return sorted(name for name, _ in self._scans().groups())

    def scan(self, scan_id: str) -> ScanStore:
        try:
            node = self._scans()[scan_id]
        except KeyError as exc:
            raise StoreNotFoundError(f"no scan {scan_id!r} in {self.uri}") from exc
        if not isinstance(node, zarr.Group):
            raise StoreNotFoundError(f"{scan_id!r} in {self.uri} is not a scan group")
        return ScanStore(self, node, scan_id)

    def scans(self) -> list[ScanStore]:
        return [self.scan(s) for s in self.scan_ids()]

    def create_scan(self, manifest: ScanManifest) -> ScanStore:
        """Create (or reopen, for a resumed write of the same source) the group of one scan."""
        if manifest.site_id != self.site_id:
            raise InvalidInputError(f"scan {manifest.scan_id!r} is for site {manifest.site_id!r}, not {self.site_id!r}")
        if manifest.scan_id in self.scan_ids():
            scan = self.scan(manifest.scan_id)
            old = scan.manifest
            if old.source_sha256 != manifest.source_sha256:
                raise InvalidInputError(
                    f"scan id {manifest.scan_id!r} already exists in {self.uri} with other source data"
                )
            scan._set_meta({**scan._meta(), "manifest": manifest.model_dump(mode="json")})
            return scan
        group = self._scans().create_group(
            manifest.scan_id, attributes={"fedscan": {"manifest": manifest.model_dump(mode="json"), "provenance": {}}}
        )
        return ScanStore(self, group, manifest.scan_id)

    def find_source(self, source_sha256: str, *, stage: str = "ingest") -> str | None:
        """The scan that completed ``stage`` from this source checksum, if any."""
        for scan in self.scans():
            with contextlib.suppress(StoreNotFoundError, InvalidInputError):
                if scan.manifest.source_sha256 == source_sha256 and scan.is_done(stage):
                    return scan.scan_id
        return None


def _has_group(store: StoreLike) -> bool:
    try:
        _open_group(store, mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError, ValueError):
        return False
    return True


def site_store_uri(data_root: str | Path, site_id: str) -> str:
    """Where a site's store lives under a data root (local folder or fsspec URL)."""
    validate_id(IdKind.SITE, site_id, error=InvalidInputError)  # before the id becomes part of a path
    return f"{str(data_root).rstrip('/')}/{site_id}.zarr"


def find_site_stores(folder: str | Path) -> list[Path]:
    """Every fedscan site store directly inside a local folder."""
    base = Path(folder)
    found = []
    for child in sorted(base.glob("*.zarr")):
        with contextlib.suppress(NotAFedscanStoreError, StoreNotFoundError):
            SiteStore.open(child, mode="r")
            found.append(child)
    return found
