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


class TrainingDivergedError(FedscanError, FloatingPointError):
    """A training loss became NaN or inf; the update is rejected (never saved or averaged)."""
