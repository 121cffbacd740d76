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

Integrity: every chunk ends in a crc32c checksum (zarr's ``crc32c`` codec after the compressor), so a flipped
bit or a truncated chunk fails as :class:`~tasks.errors.CorruptChunkError` naming store, scan, array and chunk
key instead of decoding to wrong numbers; :func:`verify_store` checks every chunk and record and
:func:`migrate_store` adds checksums to arrays written before they existed. A metadata document that does not
parse is :class:`~tasks.errors.CorruptMetadataError` naming the document.

One writer per (scan, stage): :meth:`ScanStore.run_stage` (and the ingest path, via :meth:`SiteStore.lease`)
holds a lease (``tasks.leases``: flock for folders, exclusive-create objects for fsspec URLs, a process lock for
in-memory stores) while it writes; a second writer is refused with :class:`~tasks.errors.LeaseHeldError`.
The scan group's attributes are only changed under the scan's ``_meta`` lease and re-read from the store first,
so concurrent stage records are never lost.

Everything that reads or writes Zarr bytes stays in this one module (the house rule: one module touches
Zarr), which is why it is longer than ~600 lines; the lease mechanics that need no Zarr live in
``tasks/leases.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import functools
import json
import logging
import math
import os
import shutil
import subprocess
import threading
import time
import uuid
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
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.indexing import BasicIndexer
from zarr.storage import FsspecStore, LocalStore, MemoryStore

from schemas.base import StageConfig
from schemas.ids import IdKind, validate_id
from schemas.manifest import ProvenanceRecord, ScanManifest
from tasks import leases
from tasks.errors import (
    CorruptChunkError,
    CorruptMetadataError,
    InvalidInputError,
    NotAFedscanStoreError,
    StageIncompleteError,
    StoreNotFoundError,
    StoreWriteError,
    StoreWriteInterruptedError,
)
from tasks.extras import require_store_protocol

STORE_KIND = "fedscan-site-store"
_CREATE_LOCK = threading.Lock()
FORMAT_VERSION = 1
SCANS = "scans"

#: The lease under which a scan's attributes (manifest, provenance records) are read-modify-written, and how long
#: a record write waits for it (record writes take milliseconds; 400 at once from 8 processes took ~2 s here).
META_LEASE = "_meta"
META_LEASE_WAIT_S = 120.0

#: Target bytes per chunk: >= 1 MB (field notes) and small enough that a task's working set stays in cache
#: and memory: a few MB.
TARGET_CHUNK_BYTES = 8 * 2**20


def default_compressors() -> tuple[BloscCodec | Crc32cCodec, ...]:
    """Bytes-to-bytes codecs of every fedscan array: Blosc-Zstd level 1 with bit shuffle, then a crc32c checksum.

    The compressor was chosen by ``benchmarks/storage.py`` (simulated noisy line integrals, uint16 counts, float32
    volumes): it compressed 1.30x / 1.71x / 1.44x, read as fast as no compression and wrote at 0.5-0.65x its
    speed; LZ4 was no faster and compressed less, zstd-5 and gzip cost 2-20x more write time for a few percent.
    The checksum comes last, so it covers the bytes as stored: without it most single-bit flips in a Blosc chunk
    decode silently to wrong values; with it a flipped bit or a truncated chunk fails to read.
    """
    return (BloscCodec(cname="zstd", clevel=1, shuffle=BloscShuffle.bitshuffle), Crc32cCodec())


def has_checksums(array: zarr.Array) -> bool:
    """True when ``array``'s codec chain ends in zarr's ``crc32c`` codec (its chunks carry a checksum)."""
    codecs: tuple[Any, ...] = tuple(getattr(array.metadata, "codecs", ()))
    return bool(codecs) and isinstance(codecs[-1], Crc32cCodec)


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


# ------------------------------------------------------------------------------------------------
# Integrity: chunks that do not decode, metadata documents that do not parse
# ------------------------------------------------------------------------------------------------
#: What a chunk that fails to decode raises inside zarr: the crc32c codec a ValueError, Blosc a RuntimeError.
_DECODE_ERRORS = (ValueError, RuntimeError, TypeError)


def _array_name(array: zarr.Array) -> str:
    return array.path.rsplit("/", 1)[-1] if array.path else "<root>"


def chunk_fault(array: zarr.Array, coords: tuple[int, ...]) -> str | None:
    """Why the chunk at ``coords`` does not decode (``"checksum mismatch"``, or the decoder's message), or None
    when it decodes (an absent chunk decodes to the fill value)."""
    region = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(coords, array.chunks, array.shape, strict=True))
    try:
        zarr.Array.get_basic_selection(array, region)
    except _DECODE_ERRORS as exc:
        text = str(exc)
        if "checksum do not match" in text:
            return "checksum mismatch"
        return f"does not decode ({type(exc).__name__}: {text.splitlines()[0] if text else 'no message'})"
    return None


@dataclass(frozen=False)
class CheckedArray(zarr.Array):
    """A zarr array whose reads turn a chunk that does not decode into :class:`CorruptChunkError`.

    Reads are plain zarr reads; only when one fails does the array decode the chunks it touched one by one to
    name the bad one (so the happy path costs nothing). Dask reads through ``__getitem__`` and gets the same.
    """

    _where: str = ""
    _scan_id: str | None = None

    def _corrupt(self, exc: Exception, candidates: Iterator[tuple[int, ...]] | None) -> CorruptChunkError | None:
        coords = candidates if candidates is not None else (idx for idx, _ in chunk_regions(self.shape, self.chunks))
        for idx in coords:
            fault = chunk_fault(self, idx)
            if fault is not None:
                key = self.metadata.encode_chunk_key(idx)
                name = _array_name(self)
                return CorruptChunkError(
                    f"corrupt chunk {key!r} of array {name!r} in {self._where or self.store}: {fault}",
                    array=name,
                    chunk_key=key,
                    scan_id=self._scan_id,
                )
        return None

    def _basic_coords(self, selection: Any) -> Iterator[tuple[int, ...]] | None:
        try:
            indexer = BasicIndexer(selection, self.shape, self.metadata.chunk_grid)
        except (IndexError, TypeError, ValueError):
            return None
        return (tuple(p.chunk_coords) for p in indexer)

    def get_basic_selection(self, selection: Any = Ellipsis, **kwargs: Any) -> Any:
        try:
            return super().get_basic_selection(selection, **kwargs)
        except _DECODE_ERRORS as exc:
            corrupt = self._corrupt(exc, self._basic_coords(selection))
            if corrupt is None:
                raise
            raise corrupt from exc

    def get_orthogonal_selection(self, selection: Any, **kwargs: Any) -> Any:
        try:
            return super().get_orthogonal_selection(selection, **kwargs)
        except _DECODE_ERRORS as exc:
            corrupt = self._corrupt(exc, None)
            if corrupt is None:
                raise
            raise corrupt from exc

    def get_coordinate_selection(self, selection: Any, **kwargs: Any) -> Any:
        try:
            return super().get_coordinate_selection(selection, **kwargs)
        except _DECODE_ERRORS as exc:
            corrupt = self._corrupt(exc, None)
            if corrupt is None:
                raise
            raise corrupt from exc

    def get_mask_selection(self, mask: Any, **kwargs: Any) -> Any:
        try:
            return super().get_mask_selection(mask, **kwargs)
        except _DECODE_ERRORS as exc:
            corrupt = self._corrupt(exc, None)
            if corrupt is None:
                raise
            raise corrupt from exc

    def get_block_selection(self, selection: Any, **kwargs: Any) -> Any:
        try:
            return super().get_block_selection(selection, **kwargs)
        except _DECODE_ERRORS as exc:
            corrupt = self._corrupt(exc, None)
            if corrupt is None:
                raise
            raise corrupt from exc


def _checked(array: zarr.Array, *, where: str, scan_id: str | None) -> CheckedArray:
    return CheckedArray(array._async_array, _where=where, _scan_id=scan_id)


def _metadata_error(document: str, exc: Exception) -> CorruptMetadataError:
    if isinstance(exc, KeyError):
        text = f"no {exc.args[0]!r} key" if exc.args else "a key is missing"
    else:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return CorruptMetadataError(f"{document}: corrupt metadata document ({text})", document=document)


#: What zarr raises on a metadata document that is not JSON (JSONDecodeError is a ValueError) or not valid
#: Zarr v3 metadata (MetadataValidationError is a ValueError; a wrong type inside is a TypeError/KeyError).
_METADATA_ERRORS = (ValueError, TypeError, KeyError, AttributeError)


def _child_nodes(
    store: Store, prefix: str, where: str, *, corrupt: dict[str, CorruptMetadataError] | None = None
) -> dict[str, str]:
    """``{name: node_type}`` of the Zarr nodes directly below ``prefix``, read from their ``zarr.json``.

    Names starting with ``.`` (lock files) are not nodes. A document that does not parse raises
    :class:`CorruptMetadataError` naming it (zarr's own member listing raises a bare JSONDecodeError), or, when
    ``corrupt`` is given, is put there by child name and the listing goes on.
    """
    proto = default_buffer_prototype()

    async def collect() -> dict[str, str]:
        names = sorted(
            n for n in {n async for n in store.list_dir(prefix)} if not n.startswith(".") and n != "zarr.json"
        )
        keys = [f"{prefix}/{name}/zarr.json" if prefix else f"{name}/zarr.json" for name in names]
        bufs = await asyncio.gather(*(store.get(key, prototype=proto) for key in keys))  # as zarr's own listing
        found: dict[str, str] = {}
        for name, key, buf in zip(names, keys, bufs, strict=True):
            if buf is None:
                continue
            try:
                doc = json.loads(buf.to_bytes())
                node_type = doc["node_type"]
                if node_type not in ("array", "group"):
                    raise ValueError(f"node_type {node_type!r}")
            except (*_METADATA_ERRORS, UnicodeDecodeError) as exc:
                error = _metadata_error(f"{where.rstrip('/')}/{key}", exc)
                if corrupt is None:
                    raise error from exc
                corrupt[name] = error
                continue
            found[name] = str(node_type)
        return found

    nodes: dict[str, str] = _run_sync(collect())
    return nodes


def _write_block(target: zarr.Array, block: np.ndarray, region: tuple[slice, ...]) -> int:
    """Write one chunk. Module level so tests can inject a fault into the write loop."""
    target[region] = block
    return 1


def _write_error(exc: OSError, *, where: str, what: str) -> StoreWriteError:
    """An OSError from the store as a :class:`StoreWriteError` naming the store and what was being written;
    a lost connection or a timeout stays retryable (:class:`StoreWriteInterruptedError` is a TransientError)."""
    reason = str(exc) or type(exc).__name__
    kind = StoreWriteInterruptedError if isinstance(exc, ConnectionError | TimeoutError) else StoreWriteError
    return kind(f"{where}: writing {what} failed: {reason}", errno_=exc.errno)


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


def write_missing_chunks(
    target: zarr.Array, source: da.Array, *, progress: ProgressFn | None = None, where: str | None = None
) -> WriteReport:
    """Compute and write only the chunks of ``target`` that are not yet in the store.

    ``source`` is rechunked to ``target``'s chunk grid, so each task writes whole chunks and no two
    tasks touch the same chunk. Runs on the current dask scheduler (a ``distributed.Client`` when one
    is active). A fault part-way leaves every finished chunk in place; calling again finishes the rest.
    ``progress(done, total)`` is called as chunks land on disk, and once with ``done == total`` at the end
    (``total`` counts this call's chunks only). An :class:`OSError` from the store (a full disk) is raised as
    :class:`StoreWriteError` naming ``where`` (default: the store) and the array.
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
        # the array rides in a partial: as an argument, dask would walk its dataclass fields (~6 ms per chunk)
        todo.append(dask.delayed(functools.partial(_write_block, writer), pure=False)(blocks[idx], region))
    if todo:
        try:
            _compute_writes(target, todo, progress, present=len(present))
        except StoreWriteError:
            raise
        except OSError as exc:
            raise _write_error(exc, where=where or str(target.store), what=f"array {_array_name(target)!r}") from exc
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

    @property
    def where(self) -> str:
        """``scan 'x' of <store>``, for messages."""
        return f"scan {self.scan_id!r} of {self.site.uri}"

    def lease(self, stage: str, *, wait_s: float = 0.0, **info: Any) -> contextlib.AbstractContextManager[None]:
        """Hold this scan's lease for ``stage`` (see :meth:`SiteStore.lease`)."""
        return self.site.lease(self.scan_id, stage, wait_s=wait_s, **info)

    # ---- metadata ---------------------------------------------------------------------------
    def _document(self) -> str:
        return f"{self.site.uri.rstrip('/')}/{self.group.path}/zarr.json"

    def _reload(self) -> zarr.Group:
        """The scan group as it is in the store now (another process may have written a record since)."""
        mode: Literal["r", "r+"] = "r" if self.group.store.read_only else "r+"
        try:
            group = zarr.open_group(store=self.group.store, path=self.group.path, mode=mode, zarr_format=3)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
            raise StoreNotFoundError(f"no scan {self.scan_id!r} in {self.site.uri}") from exc
        except _METADATA_ERRORS as exc:
            raise _metadata_error(self._document(), exc) from exc
        self.group = group
        return group

    def _meta(self) -> dict[str, Any]:
        meta = self._reload().attrs.get("fedscan", {})
        return dict(meta) if isinstance(meta, Mapping) else {}

    def _update_meta(self, change: Callable[[dict[str, Any]], None]) -> None:
        """Read-modify-write of the scan's ``fedscan`` attributes under the scan's ``_meta`` lease, re-reading
        the document inside it, so concurrent writers (other stages, other processes) never lose an update."""
        with self.lease(META_LEASE, wait_s=META_LEASE_WAIT_S):
            group = self._reload()
            raw = group.attrs.get("fedscan", {})
            meta = dict(raw) if isinstance(raw, Mapping) else {}
            change(meta)
            try:
                group.update_attributes({"fedscan": meta})
            except OSError as exc:
                raise _write_error(exc, where=self.where, what="the scan's metadata (zarr.json)") from exc

    def _set_meta(self, meta: Mapping[str, Any]) -> None:
        new = dict(meta)

        def replace(current: dict[str, Any]) -> None:
            current.clear()
            current.update(new)

        self._update_meta(replace)

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
        """Every completed stage's record, by stage name (read from the store now)."""
        raw = self._meta().get("provenance", {})
        out = {}
        for stage, rec in dict(raw).items():
            try:
                out[stage] = ProvenanceRecord.model_validate(rec)
            except ValidationError as exc:
                raise InvalidInputError(
                    f"{self.where}: the provenance record of stage {stage!r} is invalid: {exc.errors()[0]['msg']}"
                ) from exc
        return out

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
        dumped = record.model_dump(mode="json")

        def put(meta: dict[str, Any]) -> None:
            prov = dict(meta.get("provenance", {}))
            prov[record.stage] = dumped
            meta["provenance"] = prov

        self._update_meta(put)

    def _drop_record(self, stage: str) -> None:
        if stage not in self._meta().get("provenance", {}):
            return

        def drop(meta: dict[str, Any]) -> None:
            prov = dict(meta.get("provenance", {}))
            prov.pop(stage, None)
            meta["provenance"] = prov

        self._update_meta(drop)

    def failure(self) -> dict[str, Any] | None:
        """The marker a run left when a stage of this scan failed (``tasks.pipeline_support``), or None."""
        raw = self._meta().get("failure")
        return dict(raw) if isinstance(raw, Mapping) else None

    def set_failure(self, marker: Mapping[str, Any] | None) -> None:
        """Record (``None``: clear) the scan's failure marker, in its metadata document under the metadata lease."""
        new = dict(marker) if marker is not None else None

        def put(meta: dict[str, Any]) -> None:
            if new is None:
                meta.pop("failure", None)
            else:
                meta["failure"] = new

        self._update_meta(put)

    # ---- arrays -----------------------------------------------------------------------------
    def array_names(self) -> list[str]:
        nodes = _child_nodes(self.group.store, self.group.path, self.site.uri)
        return sorted(name for name, kind in nodes.items() if kind == "array")

    def array(self, name: str) -> CheckedArray:
        """One array of the scan; its reads raise :class:`CorruptChunkError` on a chunk that does not decode."""
        if name.startswith(".") or "/" in name:
            raise InvalidInputError(f"{name!r} is not an array name")
        try:
            mode: Literal["r", "r+"] = "r" if self.group.store.read_only else "r+"
            node = zarr.open_array(store=self.group.store, path=f"{self.group.path}/{name}", mode=mode, zarr_format=3)
        except (FileNotFoundError, KeyError, zarr.errors.NodeTypeValidationError) as exc:
            if isinstance(exc, zarr.errors.NodeTypeValidationError) or name in self.array_names():
                raise StoreNotFoundError(f"{name!r} in scan {self.scan_id!r} is not an array") from exc
            raise StoreNotFoundError(
                f"scan {self.scan_id!r} in {self.site.uri} has no array {name!r} "
                f"(it has: {', '.join(self.array_names()) or 'none'})"
            ) from exc
        except _METADATA_ERRORS as exc:
            raise _metadata_error(f"{self.site.uri.rstrip('/')}/{self.group.path}/{name}/zarr.json", exc) from exc
        return _checked(node, where=self.where, scan_id=self.scan_id)

    def read(self, name: str, *, chunks: Any = None) -> da.Array:
        """A lazy dask view of an array (by default chunked as stored); a corrupt chunk raises
        :class:`CorruptChunkError` when computed."""
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
                and has_checksums(existing)
            )
            if same:
                return existing
        if fill_value is None:
            fill_value = np.nan if np.issubdtype(dtype, np.floating) else 0
        attrs = dict(attributes or {})
        attrs["fedscan"] = {"writing": dict(writing)}
        try:
            created = self.group.create_array(
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
        except OSError as exc:
            raise _write_error(exc, where=self.where, what=f"array {name!r} (zarr.json)") from exc
        return _checked(created, where=self.where, scan_id=self.scan_id)

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
        lease_wait_s: float = 0.0,
    ) -> StageResult:
        """Write a stage's outputs chunk by chunk, then its provenance record, holding the (scan, stage) lease.

        Skips the stage when it is already done with the same config hash and inputs (unless
        ``force``); resumes an interrupted write of the same work; recomputes otherwise.
        ``progress(fraction)`` is called as chunks are written (0 < fraction ≤ 1, over all outputs).
        Another writer of this stage of this scan (any config, any process) makes this call wait up to
        ``lease_wait_s`` and then raise :class:`~tasks.errors.LeaseHeldError` without writing anything.
        """
        config_hash = config.config_hash()
        with self.lease(stage, wait_s=lease_wait_s, config_hash=config_hash):
            return self._run_stage_leased(
                stage=stage,
                config=config,
                config_hash=config_hash,
                outputs=outputs,
                inputs=dict(inputs or {}),
                metrics=metrics,
                force=force,
                progress=progress,
            )

    def _run_stage_leased(
        self,
        *,
        stage: str,
        config: StageConfig,
        config_hash: str,
        outputs: Sequence[StageOutput],
        inputs: dict[str, str],
        metrics: MetricsFn | None,
        force: bool,
        progress: Callable[[float], None] | None,
    ) -> StageResult:
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

            report = write_missing_chunks(target, out.data, progress=part, where=self.where)
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
        """Create a new, empty site store; refuses a path that already holds anything.

        Atomic: a local store is built under a temporary name beside the target and renamed into place, so a
        failure (a full disk) leaves no half-created store behind; elsewhere the root document, attributes
        included, is one write and :meth:`open_or_create` repairs a store whose ``scans`` group is missing.
        """
        local = _is_local_path(store)
        if local is not None:
            return cls._create_local(local, site_id=site_id)
        try:
            root = _open_group_with(store, mode="w-", attributes=_root_attributes(site_id))
            root.require_group(SCANS)
        except (FileExistsError, zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError) as exc:
            raise NotAFedscanStoreError(f"{_describe(store)} already holds Zarr data") from exc
        except OSError as exc:
            raise _write_error(exc, where=_describe(store), what="a new site store") from exc
        return cls(root, _describe(store))

    @classmethod
    def _create_local(cls, local: Path, *, site_id: str) -> SiteStore:
        if local.exists() and (local.is_file() or any(local.iterdir())):
            raise NotAFedscanStoreError(f"{local} already exists and is not empty; refusing to create a store there")
        tmp = local.parent / f".{local.name}.creating-{uuid.uuid4().hex[:12]}"
        try:
            root = _open_group_with(tmp, mode="w-", attributes=_root_attributes(site_id))
            root.require_group(SCANS)
            os.rename(tmp, local)  # atomic; replaces an empty folder, fails on a non-empty one
        except OSError as exc:
            _remove_tree(tmp)
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise NotAFedscanStoreError(f"{local} was created by another writer meanwhile") from exc
            raise _write_error(exc, where=str(local), what="a new site store") from exc
        return cls(_open_group(local, mode="r+"), str(local))

    @classmethod
    def open(cls, store: StoreLike, *, mode: Literal["r", "r+"] = "r+") -> SiteStore:
        """Open an existing site store; a missing path or a non-fedscan path is a clear error, and a root
        metadata document that does not parse is :class:`CorruptMetadataError` naming it."""
        local = _is_local_path(store)
        if local is not None and not local.exists():
            raise StoreNotFoundError(f"no store at {local}")
        try:
            root = _open_group(store, mode=mode)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.ContainsArrayError, KeyError) as exc:
            raise NotAFedscanStoreError(f"{_describe(store)} is not a fedscan site store (no Zarr v3 group)") from exc
        except (json.JSONDecodeError, zarr.errors.MetadataValidationError, TypeError, UnicodeDecodeError) as exc:
            raise _metadata_error(f"{_describe(store).rstrip('/')}/zarr.json", exc) from exc
        except ValueError as exc:
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
        """Open the store when it exists (checking it belongs to ``site_id``), else create it.

        Repairs what an interrupted creation can leave: a local folder holding only an empty Zarr group (how
        fedscan before atomic creation left a store after a full disk) is replaced, and a store whose
        ``scans`` group is missing gets it.
        """
        with _CREATE_LOCK:  # concurrent ingest tasks of one site in one process must not race here
            local = _is_local_path(store)
            if local is not None and _half_created(local):
                shutil.rmtree(local)
            exists = local.exists() and any(local.iterdir()) if local is not None else _has_group(store)
            if not exists:
                try:
                    return cls.create(store, site_id=site_id)
                except NotAFedscanStoreError:
                    if local is None or not local.exists():
                        raise
            site = cls.open(store)
            if site.site_id == site_id and not isinstance(site.root.get(SCANS), zarr.Group):
                try:
                    site.root.require_group(SCANS)
                except OSError as exc:
                    raise _write_error(exc, where=site.uri, what="the 'scans' group") from exc
        if site.site_id != site_id:
            raise InvalidInputError(f"{site.uri} belongs to site {site.site_id!r}, not {site_id!r}")
        return site

    # ---- leases -----------------------------------------------------------------------------
    def _lease_backend(self, name: str) -> leases.LeaseBackend:
        store = self.root.store
        if isinstance(store, LocalStore):
            return leases.FileLease(Path(store.root) / leases.LOCKS_DIR / f"{name}.lock")
        if isinstance(store, FsspecStore):
            import fsspec

            fs = fsspec.core.url_to_fs(self.uri)[0] if "://" in self.uri else getattr(store.fs, "sync_fs", store.fs)
            path = f"{store.path.rstrip('/')}/{leases.LOCKS_DIR}/{name}.lease"
            return leases.ObjectLease(fs, path, url=f"{self.uri.rstrip('/')}/{leases.LOCKS_DIR}/{name}.lease")
        if isinstance(store, MemoryStore):
            return leases.ProcessLease(f"{id(store._store_dict)}/{name}", where=f"{self.uri} (in-process lock)")
        raise InvalidInputError(f"{self.uri}: fedscan has no lease for {type(store).__name__} stores")

    def lease(
        self, scan_id: str, stage: str, *, wait_s: float = 0.0, **info: Any
    ) -> contextlib.AbstractContextManager[None]:
        """Hold the lease of (``scan_id``, ``stage``): one writer at a time, across threads and processes.

        A local store locks ``<store>/.locks/<scan>.<stage>.lock`` with ``flock`` (dropped by the kernel when the
        holder dies); an fsspec URL creates ``<store>/.locks/<scan>.<stage>.lease`` exclusively (S3:
        ``If-None-Match``; a holder killed with SIGKILL leaves it, and the refusal names it); an in-memory store
        takes a lock in this process. Another holder makes this wait up to ``wait_s`` seconds, then raise
        :class:`~tasks.errors.LeaseHeldError` naming scan, stage and the holder. Reentrant in one context.
        """
        for what, value in (("scan id", scan_id), ("stage", stage)):
            if not value or value.startswith(".") or "/" in value or "\\" in value:
                raise InvalidInputError(f"{value!r} is not a valid {what} for a lease")
        label = "the scan's metadata" if stage == META_LEASE else f"stage {stage!r}"
        return leases.hold(
            self._lease_backend(f"{scan_id}.{stage}"),
            what=f"{label} of scan {scan_id!r} in {self.uri}",
            wait_s=wait_s,
            **info,
        )

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
        """Every scan's id, including a scan whose metadata document does not parse (opening that one with
        :meth:`scan` raises :class:`CorruptMetadataError`; the others stay readable)."""
        corrupt: dict[str, CorruptMetadataError] = {}
        nodes = _child_nodes(self._scans().store, SCANS, self.uri, corrupt=corrupt)
        return sorted([name for name, kind in nodes.items() if kind == "group"] + list(corrupt))

    def scan(self, scan_id: str) -> ScanStore:
        if not scan_id or scan_id.startswith(".") or "/" in scan_id:
            raise InvalidInputError(f"{scan_id!r} is not a scan id")
        mode: Literal["r", "r+"] = "r" if self.root.store.read_only else "r+"
        try:
            node = zarr.open_group(store=self.root.store, path=f"{SCANS}/{scan_id}", mode=mode, zarr_format=3)
        except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError) as exc:
            raise StoreNotFoundError(f"no scan {scan_id!r} in {self.uri}") from exc
        except zarr.errors.ContainsArrayError as exc:
            raise StoreNotFoundError(f"{scan_id!r} in {self.uri} is not a scan group") from exc
        except _METADATA_ERRORS as exc:
            raise _metadata_error(f"{self.uri.rstrip('/')}/{SCANS}/{scan_id}/zarr.json", exc) from exc
        return ScanStore(self, node, scan_id)

    def scans(self) -> list[ScanStore]:
        return [self.scan(s) for s in self.scan_ids()]

    def create_scan(self, manifest: ScanManifest) -> ScanStore:
        """Create (or reopen, for a resumed write of the same source) the group of one scan.

        Check and create happen under the scan's metadata lease, so of two sources ingested under one scan id
        at once exactly one gets the scan; the other is refused with :class:`InvalidInputError`.
        """
        if manifest.site_id != self.site_id:
            raise InvalidInputError(f"scan {manifest.scan_id!r} is for site {manifest.site_id!r}, not {self.site_id!r}")
        dumped = manifest.model_dump(mode="json")
        with self.lease(manifest.scan_id, META_LEASE, wait_s=META_LEASE_WAIT_S):
            if manifest.scan_id in self.scan_ids():
                scan = self.scan(manifest.scan_id)
                old = scan.manifest
                if old.source_sha256 != manifest.source_sha256:
                    raise InvalidInputError(
                        f"scan id {manifest.scan_id!r} already exists in {self.uri} with other source data"
                    )
                scan._update_meta(lambda meta: meta.update({"manifest": dumped}))
                return scan
            try:
                group = self._scans().create_group(
                    manifest.scan_id, attributes={"fedscan": {"manifest": dumped, "provenance": {}}}
                )
            except OSError as exc:
                raise _write_error(exc, where=self.uri, what=f"scan {manifest.scan_id!r} (zarr.json)") from exc
        return ScanStore(self, group, manifest.scan_id)

    def remove_scan(self, scan_id: str) -> None:
        """Delete a scan's group and every array in it (an ingest refused after it created the scan)."""
        self.scan(scan_id)  # validates the id; raises StoreNotFoundError when there is no such scan
        with self.lease(scan_id, META_LEASE, wait_s=META_LEASE_WAIT_S):
            del self._scans()[scan_id]

    def find_source(self, source_sha256: str, *, stage: str = "ingest") -> str | None:
        """The scan that completed ``stage`` from this source checksum, if any."""
        for scan_id in self.scan_ids():
            # a scan that cannot be read is not this source's scan; verify reports it, ingests go on
            with contextlib.suppress(StoreNotFoundError, InvalidInputError, CorruptMetadataError):
                scan = self.scan(scan_id)
                if scan.manifest.source_sha256 == source_sha256 and scan.is_done(stage):
                    return scan.scan_id
        return None


def _remove_tree(path: Path, *, attempts: int = 50) -> None:
    """Remove a folder that zarr may still be writing into (its event loop finishes writes already started
    after the call that failed returned), so retry until it stays gone."""
    for _ in range(attempts):
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            return
        time.sleep(0.02)


def _root_attributes(site_id: str) -> dict[str, Any]:
    return {"fedscan": {"kind": STORE_KIND, "format_version": FORMAT_VERSION, "site_id": site_id}}


def _open_group_with(store: StoreLike, *, mode: Literal["w-"], attributes: dict[str, Any]) -> zarr.Group:
    if isinstance(store, Path):
        store = str(store)
    return zarr.open_group(store=store, mode=mode, zarr_format=3, attributes=attributes)


def _half_created(local: Path) -> bool:
    """True for a local folder that an interrupted creation left: an empty root group without fedscan's
    attributes, perhaps an empty ``scans`` group and ``*.partial`` files, and nothing else."""
    if not local.is_dir():
        return False
    entries = {p.name for p in local.iterdir()}
    if not entries or not all(e in {"zarr.json", SCANS} or e.endswith(".partial") for e in entries):
        return False
    scans = local / SCANS
    if scans.is_dir() and any(p.name != "zarr.json" for p in scans.iterdir()):
        return False
    if not (local / "zarr.json").exists():
        return True
    try:
        doc = json.loads((local / "zarr.json").read_bytes())
    except (OSError, ValueError):
        return False  # a root document that does not parse is reported, never deleted
    return isinstance(doc, dict) and doc.get("node_type") == "group" and "fedscan" not in doc.get("attributes", {})


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


def find_site_stores(folder: str | Path, *, include_corrupt: bool = False) -> list[str | Path]:
    """Every fedscan site store directly inside a local folder (as paths) or an fsspec URL (``memory://``,
    ``s3://``...: as URLs under the one given).

    A store whose root metadata document does not parse is left out with a warning in the log (one bad store
    must not stop the others' nightly run), or listed when ``include_corrupt`` (for ``fedscan verify``). A URL
    whose protocol is unknown, or that cannot be listed, is :class:`InvalidInputError` naming it.
    """
    local = _is_local_path(folder)
    if local is not None:
        candidates: list[str | Path] = list(sorted(local.glob("*.zarr")))
    else:
        candidates = [f"{str(folder).rstrip('/')}/{name}" for name in _listed_zarr_names(str(folder))]
    found: list[str | Path] = []
    for child in candidates:
        try:
            SiteStore.open(child, mode="r")
        except (NotAFedscanStoreError, StoreNotFoundError):
            continue
        except CorruptMetadataError as exc:
            if not include_corrupt:
                logging.getLogger(__name__).warning("site store skipped: %s", exc)
                continue
        found.append(child)
    return found


def _listed_zarr_names(url: str) -> list[str]:
    """Names ending ``.zarr`` directly under an fsspec URL (sorted)."""
    import fsspec

    try:
        require_store_protocol(url)  # a missing optional extra (s3fs) is one line naming it
    except ValueError as exc:  # fsspec: "Protocol not known"
        raise InvalidInputError(f"{url}: not a storage URL fedscan can read ({exc})") from exc
    try:
        fs, path = fsspec.core.url_to_fs(url)
        entries = fs.ls(path, detail=False)
    except FileNotFoundError as exc:
        raise StoreNotFoundError(f"no data root at {url}") from exc
    except Exception as exc:  # unknown protocol, refused credentials, unreachable endpoint: one line naming it
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise InvalidInputError(f"cannot list the data root {url}: {type(exc).__name__}: {reason}") from exc
    names = {str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries}
    return sorted(n for n in names if n.endswith(".zarr"))


# ------------------------------------------------------------------------------------------------
# Verify and migrate
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StoreProblem:
    """One thing :func:`verify_store` found wrong: where (site, scan, array, chunk key or document) and why."""

    site: str
    scan: str | None
    array: str | None
    key: str | None
    reason: str

    def line(self) -> str:
        parts = [f"site {self.site}"]
        if self.scan is not None:
            parts.append(f"scan {self.scan}")
        if self.array is not None:
            parts.append(f"array {self.array}")
        if self.key is not None:
            parts.append(
                f"{'chunk' if self.array is not None and not self.key.endswith('zarr.json') else 'at'} {self.key}"
            )
        return "  ".join(parts) + f": {self.reason}"


@dataclass
class VerifyReport:
    """What :func:`verify_store` checked and found."""

    uri: str
    site: str
    problems: list[StoreProblem] = field(default_factory=list)
    scans: int = 0
    arrays: int = 0
    chunks: int = 0
    records: int = 0
    without_checksums: list[str] = field(default_factory=list)  # "scan/array"

    @property
    def ok(self) -> bool:
        return not self.problems


def _crc(raw: bytes) -> bytes:
    import google_crc32c

    return np.array([google_crc32c.value(raw)], dtype=np.uint32).view("B").tobytes()  # as zarr's crc32c codec


def verify_store(store: StoreLike) -> VerifyReport:
    """Decode every chunk of every array of every scan and check every stage record.

    A chunk that fails its crc32c checksum or does not decode, a metadata document that does not parse, an
    invalid manifest or record, a record whose output array is missing, has missing chunks or was written by
    another config: each is one :class:`StoreProblem`. Arrays written before checksums existed are listed in
    ``without_checksums`` (their chunks are still decoded; :func:`migrate_store` adds checksums).
    A root document that does not parse raises :class:`CorruptMetadataError` (there is no store to walk).
    """
    site = SiteStore.open(store, mode="r")
    report = VerifyReport(uri=site.uri, site=site.site_id)
    add = report.problems.append
    bad_scans: dict[str, CorruptMetadataError] = {}
    scan_ids = sorted(
        n for n, kind in _child_nodes(site.root.store, SCANS, site.uri, corrupt=bad_scans).items() if kind == "group"
    )
    for name, err in sorted(bad_scans.items()):
        add(StoreProblem(site.site_id, name, None, err.document, "corrupt metadata document"))
    for scan_id in scan_ids:
        report.scans += 1
        try:
            scan = site.scan(scan_id)
            scan.manifest  # noqa: B018 - validates the manifest
        except (CorruptMetadataError, InvalidInputError, StoreNotFoundError) as exc:
            add(StoreProblem(site.site_id, scan_id, None, getattr(exc, "document", None), str(exc)))
            continue
        bad_arrays: dict[str, CorruptMetadataError] = {}
        nodes = _child_nodes(scan.group.store, scan.group.path, site.uri, corrupt=bad_arrays)
        for name, err in sorted(bad_arrays.items()):
            add(StoreProblem(site.site_id, scan_id, name, err.document, "corrupt metadata document"))
        for name in sorted(n for n, kind in nodes.items() if kind == "array"):
            _verify_array(scan, name, report)
        try:
            records = scan.provenance()
        except InvalidInputError as exc:
            add(StoreProblem(site.site_id, scan_id, None, None, str(exc)))
            continue
        for stage, rec in records.items():
            report.records += 1
            for out in rec.outputs:
                if out not in bad_arrays:
                    _verify_record_output(scan, stage, rec, out, exists=out in nodes, report=report)
    return report


def _verify_record_output(
    scan: ScanStore, stage: str, rec: ProvenanceRecord, out: str, *, exists: bool, report: VerifyReport
) -> None:
    def problem(reason: str) -> None:
        report.problems.append(StoreProblem(report.site, scan.scan_id, out, None, reason))

    if not exists:
        problem(f"stage {stage!r} is recorded done but the array is missing")
        return
    arr = scan.array(out)
    left = missing_chunks(arr)
    if left:
        problem(f"stage {stage!r} is recorded done but {left} chunks are missing")
    marker = arr.attrs.get("fedscan", {})
    writing = marker.get("writing") if isinstance(marker, Mapping) else None
    if isinstance(writing, Mapping) and writing.get("stage") == stage and writing.get("config_hash") != rec.config_hash:
        problem(f"written by config {writing.get('config_hash')} but stage {stage!r} records {rec.config_hash}")


def _verify_array(scan: ScanStore, name: str, report: VerifyReport) -> None:
    try:
        arr = scan.array(name)
    except CorruptMetadataError as exc:
        report.problems.append(StoreProblem(report.site, scan.scan_id, name, exc.document, "corrupt metadata document"))
        return
    report.arrays += 1
    if not has_checksums(arr):
        report.without_checksums.append(f"{scan.scan_id}/{name}")
    present = present_chunk_keys(arr)
    for idx, _ in chunk_regions(arr.shape, arr.chunks):
        key = arr.metadata.encode_chunk_key(idx)
        if key not in present:
            continue
        report.chunks += 1
        fault = chunk_fault(arr, idx)
        if fault is not None:
            report.problems.append(StoreProblem(report.site, scan.scan_id, name, key, fault))


@dataclass
class MigrateReport:
    """What :func:`migrate_store` changed: ``scan/array`` names given checksums, and chunks rewritten."""

    uri: str
    arrays: list[str] = field(default_factory=list)
    chunks: int = 0


def migrate_store(store: StoreLike) -> MigrateReport:
    """Give every array without checksums the crc32c codec, in place and resumably.

    zarr's crc32c codec is the last codec: a chunk with it is the chunk without it plus 4 checksum bytes. So each
    chunk is read raw, checked to decode with the old codecs, and rewritten with its checksum appended; then the
    array's ``zarr.json`` gets the codec. A chunk that already ends in its own checksum is skipped (an interrupted
    migration resumes; a chunk whose last 4 bytes match by chance, odds 2**-32, would be skipped wrongly). A chunk
    that does not decode stops the migration with :class:`CorruptChunkError` (a checksum over damaged bytes would
    bless them). Holds each array's stage lease, so it refuses to run beside a writer of that stage.
    """
    site = SiteStore.open(store, mode="r+")
    report = MigrateReport(uri=site.uri)
    for scan in site.scans():
        for name in scan.array_names():
            arr = scan.array(name)
            if has_checksums(arr):
                continue
            marker = arr.attrs.get("fedscan", {})
            writing = marker.get("writing", {}) if isinstance(marker, Mapping) else {}
            stage = str(writing.get("stage") or META_LEASE) if isinstance(writing, Mapping) else META_LEASE
            with scan.lease(stage):
                report.chunks += _migrate_array(scan, arr)
            report.arrays.append(f"{scan.scan_id}/{name}")
    return report


def _migrate_array(scan: ScanStore, arr: CheckedArray) -> int:
    store, proto, prefix = arr.store, default_buffer_prototype(), arr.path
    present = present_chunk_keys(arr)
    rewritten = 0
    for idx, _ in chunk_regions(arr.shape, arr.chunks):
        key = arr.metadata.encode_chunk_key(idx)
        if key not in present:
            continue
        buf = _run_sync(store.get(f"{prefix}/{key}", prototype=proto))
        if buf is None:
            continue
        raw = buf.to_bytes()
        if len(raw) > 4 and _crc(raw[:-4]) == raw[-4:]:
            continue  # migrated by an earlier, interrupted run
        fault = chunk_fault(arr, idx)
        if fault is not None:
            raise CorruptChunkError(
                f"corrupt chunk {key!r} of array {_array_name(arr)!r} in {scan.where}: {fault}; not migrated",
                array=_array_name(arr),
                chunk_key=key,
                scan_id=scan.scan_id,
            )
        try:
            _run_sync(store.set(f"{prefix}/{key}", proto.buffer.from_bytes(raw + _crc(raw))))
        except OSError as exc:
            raise _write_error(exc, where=scan.where, what=f"chunk {key!r} of array {_array_name(arr)!r}") from exc
        rewritten += 1
    doc_key = f"{prefix}/zarr.json"
    buf = _run_sync(store.get(doc_key, prototype=proto))
    assert buf is not None
    doc = json.loads(buf.to_bytes())
    doc["codecs"] = [*doc["codecs"], Crc32cCodec().to_dict()]
    try:
        _run_sync(store.set(doc_key, proto.buffer.from_bytes(json.dumps(doc, indent=2).encode())))
    except OSError as exc:
        raise _write_error(exc, where=scan.where, what=f"array {_array_name(arr)!r} (zarr.json)") from exc
    return rewritten
