"""Watch a folder for complete scans and announce each one as a ``fedscan.scan.arrived`` Prefect event.

Layout: ``DIR/<site_id>/<scan>`` (or ``DIR/<scan>`` with a fixed ``site_id``), where ``<scan>`` is an NPY, NPZ or
TIFF file with its YAML sidecar, or a folder of TIFF views / DICOM slices holding ``fedscan.yaml``.

A scan is complete when (1) its sidecar exists, (2) the size and modification time of all its files stayed the
same for ``settle_seconds`` across polls, and (3) it opens as a whole (``open_source``: a truncated NPY, a
half-written TIFF or a missing DICOM slice does not). Emitted scans are remembered (by path and file
signature) in ``DIR/.fedscan-watch.json``, so a restarted watcher does not announce them again, while a scan
replaced by new content is announced anew.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tasks.errors import InvalidInputError
from tasks.ingest import SIDECAR_NAMES, TIFF_SUFFIXES, find_sidecar, open_source

EVENT_NAME = "fedscan.scan.arrived"
STATE_FILE = ".fedscan-watch.json"
DATA_SUFFIXES = (".npy", ".npz", *TIFF_SUFFIXES)

logger = logging.getLogger("fedscan.watch")


@dataclass(frozen=True)
class ScanArrival:
    """One complete scan found by the watcher."""

    site_id: str
    path: Path
    signature: str

    def payload(self) -> dict[str, str]:
        return {"site_id": self.site_id, "path": str(self.path), "signature": self.signature}


Emitter = Callable[[ScanArrival], None]


def emit_prefect_event(arrival: ScanArrival) -> None:
    """Emit ``fedscan.scan.arrived`` to the configured Prefect API (deployments trigger on it)."""
    from prefect.events import emit_event

    emit_event(
        event=EVENT_NAME,
        resource={
            "prefect.resource.id": f"fedscan.scan.{arrival.site_id}.{arrival.path.name}",
            "prefect.resource.name": arrival.path.name,
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
        self.root = root
        self.site_id = site_id
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
        sites = (
            [(self.site_id, self.root)]
            if self.site_id
            else [(d.name, d) for d in sorted(self.root.iterdir()) if d.is_dir() and not d.name.startswith(".")]
        )
        found = []
        for site, folder in sites:
            assert site is not None
            for item in sorted(folder.iterdir()):
                if item.name.startswith("."):
                    continue
                if (item.is_file() and item.suffix.lower() in DATA_SUFFIXES) or (
                    item.is_dir() and any((item / n).is_file() for n in SIDECAR_NAMES)
                ):
                    found.append((site, item))
        return found

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
            if find_sidecar(item) is None:
                continue
            try:
                open_source(item)
            except InvalidInputError as exc:
                if (item, sig) not in self._broken:
                    self._broken.add((item, sig))
                    logger.warning("%s is stable but does not open as a scan yet: %s", item, exc)
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
