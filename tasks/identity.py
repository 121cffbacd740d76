"""A site's identity keeping: its scan-id key, its id map (source name -> scan id) and its label allow-list.

All of it lives in the site's own store under ``<site>.zarr/identity/`` and nowhere else: no stage, report,
artifact, log line, event or federated reader reads that group. It is site-only by construction.

Scan ids (the rule, decided here):

* A scan id is never derived from a file or folder name: names like ``DOE_JANE_19700101_MRN123456.npy`` are
  common at scanner consoles and would travel in task-run names, artifacts and reports.
* An id the site gives explicitly (sidecar ``scan_id``, ``fedscan ingest --scan-id``) is used when it is a safe id
  and does not look like identity (:func:`schemas.ids.check_chosen_scan_id`).
* Otherwise the id is keyed: ``scan-`` + 16 consonants from HMAC-SHA256(site secret, source checksum). The same
  content gets the same id at this site (a rerun after a fault resumes the same scan), yet another site, or anyone
  holding the file, cannot compute or confirm it. Consonants only: no digits (nothing that reads as a date or an
  ID number) and no vowels (no words), about 69 bits.
* The source's own names go to the id map (``identity/scans/<scan_id>``), for the site's operators only.

The site secret is 32 random bytes made on first use, under the identity group's lease: of two processes making
it at the same instant, the second reads the first's, so every id stays recomputable from its content. Label
keys a site adds are stored here too (:meth:`SiteIdentity.allow_label_keys`).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import secrets
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from schemas.ids import IdKind, validate_id
from schemas.manifest import DEFAULT_LABEL_KEYS, check_labels, identifying_label_key
from tasks.errors import InvalidInputError
from tasks.storage import SiteStore

__all__ = ["IDENTITY_GROUP", "SiteIdentity"]

IDENTITY_GROUP = "identity"
_ATTR = "fedscan_identity"
_ID_ALPHABET = "bcdfghjklmnpqrstvwxz"
_ID_LETTERS = 16


def _keyed_id(secret: bytes, source_sha256: str) -> str:
    digest = hmac.new(secret, b"fedscan-scan-id\0" + source_sha256.encode(), hashlib.sha256).digest()
    n = int.from_bytes(digest, "big")
    letters = []
    for _ in range(_ID_LETTERS):
        n, k = divmod(n, len(_ID_ALPHABET))
        letters.append(_ID_ALPHABET[k])
    return "scan-" + "".join(letters)


#: How long a writer of the identity group waits for another (an update takes milliseconds), seconds.
_IDENTITY_WAIT_S = 60.0


class SiteIdentity:
    """The identity group of one site store (created on first write)."""

    def __init__(self, site: SiteStore) -> None:
        self.site = site

    def _group(self) -> Any:
        return self.site.root.require_group(IDENTITY_GROUP)

    def _meta(self) -> dict[str, Any]:
        group = self.site.root.get(IDENTITY_GROUP)  # reading creates nothing: a refused ingest leaves no trace
        meta = group.attrs.get(_ATTR) if group is not None else None
        return dict(meta) if isinstance(meta, Mapping) else {}

    def _lease(self) -> contextlib.AbstractContextManager[None]:
        """One writer of the identity group at a time, across processes (concurrent ingests of one site create
        and update it together; zarr's require_group is a check-then-create)."""
        return self.site.lease(IDENTITY_GROUP, "write", wait_s=_IDENTITY_WAIT_S)

    def _update(self, **fields: Any) -> None:
        with self._lease():
            group = self._group()
            group.update_attributes({_ATTR: {**self._meta(), **fields}})

    def _secret(self) -> bytes:
        key = self._meta().get("scan_id_key")
        if isinstance(key, str) and len(key) == 64:
            return bytes.fromhex(key)
        with self._lease():  # read again under the lease: the first writer's key wins, every id stays stable
            key = self._meta().get("scan_id_key")
            if not isinstance(key, str) or len(key) != 64:
                key = secrets.token_hex(32)
                self._update(scan_id_key=key)
        return bytes.fromhex(key)

    def keyed_scan_id(self, source_sha256: str) -> str:
        """The scan id of a source at this site: keyed by the site's secret, never derived from a name."""
        return _keyed_id(self._secret(), source_sha256)

    # ---- the id map ------------------------------------------------------------------------------
    def record_source(self, scan_id: str, *, source: str, names: Sequence[str]) -> None:
        """Keep where a scan came from (path as given, file names) in the site's id map."""
        validate_id(IdKind.SCAN, scan_id, error=InvalidInputError)
        with self._lease():
            scans = self._group().require_group("scans")
            scans.require_group(scan_id).update_attributes({_ATTR: {"source": source, "names": list(names)}})

    def forget_source(self, scan_id: str) -> None:
        """Drop ``scan_id`` from the id map (its ingest was refused and rolled back)."""
        import zarr

        validate_id(IdKind.SCAN, scan_id, error=InvalidInputError)
        with self._lease():
            scans = self.site.root.get(f"{IDENTITY_GROUP}/scans")
            if isinstance(scans, zarr.Group) and scan_id in scans:
                del scans[scan_id]

    def source_of(self, scan_id: str) -> dict[str, Any] | None:
        """What the id map holds for ``scan_id`` (``source`` path and file ``names``), or None."""
        validate_id(IdKind.SCAN, scan_id, error=InvalidInputError)
        node = self.site.root.get(f"{IDENTITY_GROUP}/scans/{scan_id}")
        meta = node.attrs.get(_ATTR) if node is not None else None
        return dict(meta) if isinstance(meta, Mapping) else None

    # ---- labels ----------------------------------------------------------------------------------
    def label_keys(self) -> frozenset[str]:
        """The label keys this site accepts: the defaults plus the site's own additions."""
        extra = self._meta().get("label_keys", [])
        return DEFAULT_LABEL_KEYS | frozenset(str(k) for k in extra)

    def allow_label_keys(self, keys: Iterable[str]) -> frozenset[str]:
        """Add label keys to this site's allow-list; keys that could identify a patient are refused."""
        new = sorted(set(keys))
        bad = [k for k in new if identifying_label_key(k)]
        if bad:
            raise InvalidInputError(f"label keys {bad} could identify a patient; they cannot be allowed")
        try:
            check_labels(dict.fromkeys(new, True))
        except ValueError as exc:
            raise InvalidInputError(f"{self.site.uri}: {exc}") from exc
        current = set(self._meta().get("label_keys", []))
        self._update(label_keys=sorted(current | set(new)))
        return self.label_keys()

    def check_labels(self, labels: Mapping[str, Any], *, where: str) -> None:
        """Refuse labels outside this site's allow-list or with identity-like values (naming key, not value)."""
        try:
            check_labels(dict(labels), allowed_keys=self.label_keys())
        except ValueError as exc:
            raise InvalidInputError(f"{where}: {exc}") from exc
