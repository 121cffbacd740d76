"""The one error hierarchy of fedscan.

Every error fedscan raises on purpose subclasses :class:`FedscanError`; where a builtin exception
means the same thing, the class subclasses it too, so callers that catch ``ValueError`` or
``FileNotFoundError`` keep working. :class:`TransientError` is the only class that Prefect retries.
"""

from __future__ import annotations


class FedscanError(Exception):
    """Base class of every error fedscan raises deliberately."""


class InvalidInputError(FedscanError, ValueError):
    """An input (file, array, geometry, config) is malformed or inconsistent."""


class StoreNotFoundError(FedscanError, FileNotFoundError):
    """A store, scan or array that was asked for does not exist."""


class NotAFedscanStoreError(FedscanError, ValueError):
    """A path exists but does not hold a fedscan site store."""


class AlreadyIngestedError(FedscanError):
    """The same source (by checksum) was already ingested into this store."""

    def __init__(self, message: str, *, scan_id: str) -> None:
        super().__init__(message)
        self.scan_id = scan_id


class StageIncompleteError(FedscanError):
    """A stage's output is missing chunks or its provenance record."""


class DeviceUnavailableError(FedscanError, RuntimeError):
    """The requested compute device (e.g. CUDA) is not available here."""


class TransientError(FedscanError):
    """A fault worth retrying (a lost worker, a busy service). The only class Prefect retries."""


class CorruptStoreError(FedscanError, ValueError):
    """Stored bytes do not decode: a chunk fails its checksum or a metadata document is not valid."""


class CorruptChunkError(CorruptStoreError):
    """One chunk of one array fails its crc32c checksum (or does not decode); names store, scan, array, key."""

    def __init__(self, message: str, *, array: str, chunk_key: str, scan_id: str | None = None) -> None:
        super().__init__(message)
        self.array = array
        self.chunk_key = chunk_key
        self.scan_id = scan_id


class CorruptMetadataError(CorruptStoreError):
    """A ``zarr.json`` metadata document is not valid JSON or not valid Zarr v3 metadata; names the document."""

    def __init__(self, message: str, *, document: str) -> None:
        super().__init__(message)
        self.document = document


class StoreWriteError(FedscanError, OSError):
    """Writing to a store failed (disk full, permissions, a lost connection); names the store and the array.

    Subclasses :class:`OSError` and keeps ``errno``, so callers that test for ``ENOSPC`` keep working.
    """

    def __init__(self, message: str, *, errno_: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_


class StoreWriteInterruptedError(StoreWriteError, TransientError):
    """A store write lost its connection or timed out (``ConnectionError`` / ``TimeoutError``): retried."""


class LeaseHeldError(TransientError):
    """Another writer holds the lease of this (scan, stage); nothing was written.

    Transient: a retry after the other writer finished either skips the stage (same config) or redoes it alone.
    """


class TrainingDivergedError(FedscanError, FloatingPointError):
    """A training loss became NaN or inf; the update is rejected (never saved or averaged)."""
