"""Leases: one writer at a time per (scan, stage) of a site store, on every kind of store fedscan opens.

Three backends, chosen by :func:`tasks.storage` from the store kind:

* :class:`FileLease` (local folders): ``fcntl.flock`` on ``<store>/.locks/<name>.lock``. The kernel drops the
  lock when the holder exits or is killed, so a crashed writer never leaves a stale lease. Lock files are
  never deleted (deleting a flock'd file lets two processes lock two different inodes).
* :class:`ObjectLease` (fsspec URLs: ``s3://``, ``memory://``, ...): an exclusive create of
  ``<store>/.locks/<name>.lease`` (``pipe_file(mode="create")``; S3 sends ``If-None-Match: *``, which AWS S3
  and recent S3-compatible servers honour), deleted on release. A holder killed with SIGKILL leaves the
  object behind: the next writer is refused with a message naming it, and an operator deletes it once that
  writer is known to be dead. There is no expiry, because a stage may legitimately run for hours.
* :class:`ProcessLease` (in-memory stores): a lock in this process, which is all an in-memory store spans.

A lease is reentrant within one context (the ingest path holds the scan's ``ingest`` lease while it creates
the scan group and runs the stage, which takes the same lease again). Waiting polls every
:data:`POLL_S` until ``wait_s`` has passed; ``wait_s=0`` refuses at once.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from tasks.errors import LeaseHeldError, StoreWriteError

POLL_S = 0.02
LOCKS_DIR = ".locks"

#: Lease ids held in the current context (for reentrancy).
_HELD: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("fedscan_leases_held", default=frozenset())


def holder_info(**extra: Any) -> dict[str, Any]:
    """Who holds a lease: process, host, since when (UTC), plus what the caller adds (e.g. a config hash)."""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        **extra,
    }


def describe_holder(raw: bytes | str | None) -> str:
    """The holder document as a short phrase for an error message."""
    try:
        info = json.loads(raw) if raw else {}
    except ValueError:
        info = {}
    if not isinstance(info, dict) or not info:
        return "another writer"
    parts = [f"pid {info.get('pid', '?')} on {info.get('host', '?')}", f"since {info.get('since', '?')}"]
    if info.get("config_hash"):
        parts.append(f"config {info['config_hash']}")
    return "another writer (" + ", ".join(parts) + ")"


class LeaseBackend(Protocol):
    """One lease: ``try_acquire`` returns True when taken, else False; ``release`` gives it back."""

    id: str
    where: str

    def try_acquire(self, holder: bytes) -> bool: ...

    def holder(self) -> bytes | None: ...

    def release(self) -> None: ...


class FileLease:
    """``fcntl.flock`` on a lock file; released by the kernel when the holder dies."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.id = f"file:{path.resolve()}"
        self.where = str(path)
        self._fd: int | None = None

    def try_acquire(self, holder: bytes) -> bool:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreWriteError(
                f"cannot create lock file {self.path}: {exc.strerror or exc}", errno_=exc.errno
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError:
            os.close(fd)
            raise
        self._fd = fd
        with contextlib.suppress(OSError):  # the holder note is informative only; a full disk must not block
            os.ftruncate(fd, 0)
            os.pwrite(fd, holder, 0)
        return True

    def holder(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except OSError:
            return None

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


#: Exclusive creates on one in-process filesystem (``memory://``) are check-then-write inside fsspec; this
#: lock makes them atomic between threads. Other filesystems do the check server-side.
_OBJECT_CREATE_LOCK = threading.Lock()


class ObjectLease:
    """A lease object created exclusively (``mode="create"``) on an fsspec filesystem; deleted on release."""

    def __init__(self, fs: Any, path: str, *, url: str) -> None:
        self.fs = fs
        self.path = path
        self.id = f"object:{url}"
        self.where = url

    def try_acquire(self, holder: bytes) -> bool:
        try:
            with _OBJECT_CREATE_LOCK:
                self.fs.pipe_file(self.path, holder, mode="create")
        except FileExistsError:  # memory: the object exists; s3fs: 412 PreconditionFailed on If-None-Match
            return False
        except OSError as exc:
            if exc.errno == errno.EEXIST:
                return False
            raise StoreWriteError(f"cannot create lease {self.where}: {exc}", errno_=exc.errno) from exc
        return True

    def holder(self) -> bytes | None:
        try:
            data = self.fs.cat_file(self.path)
        except (OSError, KeyError):
            return None
        return bytes(data)

    def release(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path)


_PROCESS_LOCKS: dict[str, tuple[threading.Lock, list[bytes]]] = {}
_PROCESS_LOCKS_GUARD = threading.Lock()


class ProcessLease:
    """A lock in this process, for stores that live in this process (``zarr.storage.MemoryStore``)."""

    def __init__(self, key: str, *, where: str) -> None:
        self.id = f"process:{key}"
        self.where = where
        with _PROCESS_LOCKS_GUARD:
            self._lock, self._holder = _PROCESS_LOCKS.setdefault(key, (threading.Lock(), [b""]))

    def try_acquire(self, holder: bytes) -> bool:
        if not self._lock.acquire(blocking=False):
            return False
        self._holder[0] = holder
        return True

    def holder(self) -> bytes | None:
        return self._holder[0]

    def release(self) -> None:
        self._holder[0] = b""
        self._lock.release()


@contextlib.contextmanager
def hold(backend: LeaseBackend, *, what: str, wait_s: float = 0.0, **info: Any) -> Iterator[None]:
    """Hold ``backend``'s lease for the block; refuse with :class:`LeaseHeldError` naming ``what`` when another
    writer holds it for longer than ``wait_s`` seconds. Reentrant within one context."""
    held = _HELD.get()
    if backend.id in held:
        yield
        return
    note = json.dumps(holder_info(**info)).encode()
    deadline = time.monotonic() + max(0.0, wait_s)
    while not backend.try_acquire(note):
        if time.monotonic() >= deadline:
            waited = f" after waiting {wait_s:g} s" if wait_s > 0 else ""
            raise LeaseHeldError(
                f"{what} is being written by {describe_holder(backend.holder())}; refused{waited} "
                f"(lease {backend.where})"
            )
        time.sleep(POLL_S)
    token = _HELD.set(held | {backend.id})
    try:
        yield
    finally:
        _HELD.reset(token)
        backend.release()
