"""Watch a folder for complete scans and announce each one as a ``fedscan.scan.arrived`` Prefect event.

Layout: ``DIR/<site_id>/<scan>`` (or ``DIR/<scan>`` with a fixed ``site_id``), where ``<scan>`` is a file of any
suffix in :data:`tasks.sources.READERS` (NPY, NPZ, TIFF with its YAML sidecar; a lone DICOM file, ``.dcm``,
``.dicom`` or ``.ima``, needs none: it describes itself), or a folder of TIFF views / DICOM slices holding
``fedscan.yaml`` (the sidecar marks the series as complete: a folder is never announced half-copied).

A scan is complete when (1) its sidecar exists where its reader needs one, (2) the size and modification time of
all its files stayed the same for ``settle_seconds`` across polls, and (3) it opens as a whole and its last view
reads (``open_source``: a truncated NPY, a half-written TIFF, a cut DICOM or a missing slice does not). Emitted
scans are remembered (by path and file signature) in ``DIR/.fedscan-watch.json``, so a restarted watcher does not
announce them again, while a scan replaced by new content is announced anew.

Identity: a scan's event names its resource by a digest of its path, not by the file name (names at scanner
consoles often hold the patient's); the payload carries the path, which the ``on-scan-arrived`` flow checks lies
inside the incoming folder (:func:`check_arrival`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from schemas.ids import IdKind, validate_id
from tasks.errors import InvalidInputError
from tasks.sources import SIDECAR_NAMES, accepted_suffixes, find_sidecar, open_source, reader_for

EVENT_NAME = "fedscan.scan.arrived"
STATE_FILE = ".fedscan-watch.json"
#: The file suffixes a scan may have (from the ingest readers' registry); folders need ``fedscan.yaml``.
DATA_SUFFIXES = accepted_suffixes()

logger = logging.getLogger("fedscan.watch")


@dataclass(frozen=True)
class ScanArrival:
    """One complete scan found by the watcher."""

    site_id: str
    path: Path
    signature: str

    def payload(self) -> dict[str, str]:
        return {"site_id": self.site_id, "path": str(self.path), "signature": self.signature}

    @property
    def resource_key(self) -> str:
        """A stable, name-free key of the scan's path (the event's resource id; the file name may identify)."""
        return hashlib.sha256(str(self.path).encode()).hexdigest()[:16]


Emitter = Callable[[ScanArrival], None]


def emit_prefect_event(arrival: ScanArrival) -> None:
    """Emit ``fedscan.scan.arrived`` to the configured Prefect API (deployments trigger on it)."""
    from prefect.events import emit_event

    emit_event(
        event=EVENT_NAME,
        resource={
            "prefect.resource.id": f"fedscan.scan.{arrival.site_id}.{arrival.resource_key}",
            "prefect.resource.name": arrival.resource_key,
            "fedscan.site-id": arrival.site_id,
        },
        payload=arrival.payload(),
    )


def _files_of(item: Path) -> list[Path]:
    if item.is_dir():
        return sorted(f for f in item.rglob("*") if f.is_file() and not f.name.startswith("."))
    side = find_sidecar(item)
    return [item] + ([side] if side is not None else [])


def signature(item: Path) -> str:
    """Count, total size and newest mtime of a scan's files: changes while anything is being written."""
    files = _files_of(item)
    stats = [f.stat() for f in files]
    return f"{len(files)}:{sum(s.st_size for s in stats)}:{max((s.st_mtime_ns for s in stats), default=0)}"


class ScanWatcher:
    """Polls a folder; announces each complete scan once."""

    def __init__(
        self,
        root: Path,
        *,
        site_id: str | None = None,
        settle_seconds: float = 2.0,
        emit: Emitter = emit_prefect_event,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not root.is_dir():
            raise InvalidInputError(f"{root}: not a folder to watch")
        self.root = root.absolute()  # the payload's path must mean the same to a worker in another folder
        self.site_id = None if site_id is None else validate_id(IdKind.SITE, site_id, error=InvalidInputError)
        self.settle_seconds = settle_seconds
        self.emit = emit
        self.clock = clock
        self._seen: dict[Path, tuple[str, float]] = {}  # path -> (signature, first time seen with it)
        self._broken: set[tuple[Path, str]] = set()
        self.state_path = root / STATE_FILE
        self.emitted: dict[str, str] = self._load_state()

    def _load_state(self) -> dict[str, str]:
        try:
            raw = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return {}
        return {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}

    def _save_state(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.emitted, indent=1, sort_keys=True))
        tmp.replace(self.state_path)

    def candidates(self) -> list[tuple[str, Path]]:
        """(site, scan path) of everything that looks like a scan, complete or not."""
        if self.site_id:
            sites = [(self.site_id, self.root)]
        else:
            sites = []
            for d in sorted(self.root.iterdir()):
                if not d.is_dir() or d.name.startswith("."):
                    continue
                try:
                    sites.append((validate_id(IdKind.SITE, d.name, error=InvalidInputError), d))
                except InvalidInputError as exc:
                    self._warn_once(d, "", f"{d}: folder name is not a site id, skipped: {exc}")
        found = []
        for site, folder in sites:
            for item in sorted(folder.iterdir()):
                if item.name.startswith("."):
                    continue
                if (item.is_file() and reader_for(item) is not None) or (
                    item.is_dir() and any((item / n).is_file() for n in SIDECAR_NAMES)
                ):
                    found.append((site, item))
        return found

    def _warn_once(self, item: Path, sig: str, message: str) -> None:
        if (item, sig) not in self._broken:
            self._broken.add((item, sig))
            logger.warning("%s", message)

    @staticmethod
    def _needs_sidecar(item: Path) -> bool:
        reader = reader_for(item) if item.is_file() else None
        return reader is None or reader.needs_sidecar

    def poll(self) -> list[ScanArrival]:
        """One pass over the folder: announce the scans that became complete."""
        now = self.clock()
        arrivals = []
        present = set()
        for site, item in self.candidates():
            present.add(item)
            try:
                sig = signature(item)
            except OSError:  # vanished between listing and stat
                continue
            if self.emitted.get(str(item)) == sig:
                continue
            prev = self._seen.get(item)
            if prev is None or prev[0] != sig:
                self._seen[item] = (sig, now)  # new, or still changing
                continue
            if now - prev[1] < self.settle_seconds:
                continue
            if self._needs_sidecar(item) and find_sidecar(item) is None:
                continue
            try:
                stack = open_source(item)
                stack.read(stack.shape[0] - 1, stack.shape[0])  # the last view: a cut file fails here
            except InvalidInputError as exc:
                self._warn_once(item, sig, f"{item} is stable but does not open as a scan yet: {exc}")
                continue
            arrival = ScanArrival(site_id=site, path=item, signature=sig)
            self.emit(arrival)
            self.emitted[str(item)] = sig
            self._save_state()
            arrivals.append(arrival)
        for gone in set(self._seen) - present:
            del self._seen[gone]
        return arrivals

    def run(self, *, interval_seconds: float = 1.0, max_seconds: float | None = None) -> int:
        """Poll until interrupted (or ``max_seconds``); returns how many scans were announced."""
        start = self.clock()
        count = 0
        while max_seconds is None or self.clock() - start < max_seconds:
            count += len(self.poll())
            time.sleep(interval_seconds)
        return count


def check_arrival(path: str | Path, site_id: str, *, incoming: str | Path | None, data_root: str | Path) -> Path:
    """The scan path of a ``fedscan.scan.arrived`` payload, once the payload is known to be safe to act on.

    Refused (:class:`InvalidInputError`, naming the rule, never the path: its name may identify a patient): a site
    id that is not a safe id; no incoming folder configured; a relative path; a path that, with symlinks
    followed, lies outside the incoming folder, inside a site store (``*.zarr``) or inside the data root (unless
    the incoming folder itself lies there). Nothing is created either way.
    """
    validate_id(IdKind.SITE, site_id, error=InvalidInputError)
    if incoming is None:
        raise InvalidInputError(
            "scan-arrived payload refused: no incoming folder is configured (FEDSCAN_INCOMING, the folder "
            "`fedscan watch` watches), so its path cannot be checked"
        )
    base = Path(incoming).resolve()
    given = Path(path)
    if not given.is_absolute():
        raise InvalidInputError(f"scan-arrived payload refused: its path is not absolute (incoming folder {base})")
    real = given.resolve()
    if real == base or not real.is_relative_to(base):
        raise InvalidInputError(f"scan-arrived payload refused: its path lies outside the incoming folder {base}")
    if any(part.lower().endswith(".zarr") for part in real.relative_to(base).parts):
        raise InvalidInputError(f"scan-arrived payload refused: its path lies inside a site store under {base}")
    root = str(data_root)
    if "://" not in root or root.startswith("file://"):
        local_root = Path(root.removeprefix("file://")).resolve()
        if real.is_relative_to(local_root) and not base.is_relative_to(local_root):
            raise InvalidInputError(f"scan-arrived payload refused: its path lies inside the data root {local_root}")
    return real
