"""Optional extras of the fedscan distribution: a missing one is one line naming the extra to install.

fsspec raises a bare ``ImportError`` ("Install s3fs to access S3") from deep inside zarr when a store URL's
protocol needs a package that is not installed; :func:`require_store_protocol` asks fsspec first, before any store
is opened, and names the extra instead.
"""

from __future__ import annotations

from os import PathLike

import fsspec

from tasks.errors import FedscanError

__all__ = ["EXTRA_BY_PROTOCOL", "MissingExtraError", "require_store_protocol"]

#: fsspec protocol → the fedscan extra that installs its implementation (pyproject.toml's optional-dependencies).
EXTRA_BY_PROTOCOL: dict[str, str] = {"s3": "s3", "s3a": "s3"}


class MissingExtraError(FedscanError, ImportError):
    """An optional dependency that a requested feature needs is not installed."""


def require_store_protocol(store: object) -> None:
    """Raise :class:`MissingExtraError` when ``store`` is a URL whose fsspec protocol cannot be imported here.

    Anything that is not a string URL (a local path, a zarr store object) passes unchecked.
    """
    if isinstance(store, PathLike) or not isinstance(store, str) or "://" not in store:
        return
    protocol = store.split("://", 1)[0].split("::")[-1]
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as exc:
        extra = EXTRA_BY_PROTOCOL.get(protocol)
        if extra is None:
            raise MissingExtraError(f"{store}: no fsspec implementation of {protocol}:// is installed ({exc})") from exc
        raise MissingExtraError(
            f"{store}: {protocol}:// stores need the optional extra '{extra}' (pip install 'fedscan[{extra}]')"
        ) from exc
