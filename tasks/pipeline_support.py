"""Small pieces the flows need that touch stores or files: finding scans, the run report."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from schemas.base import StageConfig
from schemas.refs import ScanRef
from schemas.stages import StageName
from tasks.errors import InvalidInputError, NotAFedscanStoreError, StoreNotFoundError
from tasks.report import write_report
from tasks.storage import SiteStore, find_site_stores, site_store_uri


def site_uris(data_root: str, sites: Sequence[str] | None = None) -> list[str]:
    """The stores of the named sites, or of every site store found under ``data_root``."""
    if sites:
        return [site_store_uri(data_root, s) for s in sites]
    return [str(p) for p in find_site_stores(data_root)]


def find_scans(
    data_root: str,
    sites: Sequence[str] | None = None,
    *,
    pending_for: Mapping[StageName, StageConfig] | None = None,
) -> list[ScanRef]:
    """Every scan whose ingest is complete, in the chosen sites' stores under ``data_root``; with
    ``pending_for`` (each stage's config), only the scans with a stage of their chain left to do under it."""
    from tasks.stages import pending_stages

    refs = []
    for uri in site_uris(data_root, sites):
        site = SiteStore.open(uri, mode="r")
        for scan in site.scans():
            if not scan.is_done(StageName.INGEST):
                continue
            if pending_for is not None and not pending_stages(scan, pending_for):
                continue
            refs.append(ScanRef(store_uri=uri, site_id=site.site_id, scan_id=scan.scan_id))
    return refs


def stage_rows(data_root: str) -> list[dict[str, object]]:
    """One row per (scan, completed stage) from the stores' provenance records."""
    rows: list[dict[str, object]] = []
    for path in find_site_stores(data_root):
        site = SiteStore.open(path, mode="r")
        for scan in site.scans():
            with contextlib.suppress(StoreNotFoundError, InvalidInputError):
                for stage, rec in scan.provenance().items():
                    row: dict[str, object] = {
                        "site": site.site_id,
                        "scan": scan.scan_id,
                        "stage": stage,
                        "config": rec.config_hash,
                        "seconds": round(rec.seconds, 3),
                    }
                    row.update({k: v for k, v in rec.metrics.items() if k != "seconds"})
                    rows.append(row)
    return rows


def publish_run_report(data_root: str, outcomes: Sequence[Any], federated: Mapping[str, Any] | None) -> str | None:
    """Write ``report.html`` next to the stores (local data roots only) and link it in the UI."""
    root = Path(data_root)
    if "://" in data_root or not root.is_dir():
        return None
    from tasks.drivers import report_images

    failures = [o.model_dump() for o in outcomes if not o.ok]
    sections: list[tuple[str, list[Mapping[str, object]]]] = [
        ("Scans", [o.model_dump() for o in outcomes]),
        ("Stages (from the stores' provenance records)", list(stage_rows(data_root))),
    ]
    if federated:
        sections.append(("Federated rounds", list(federated.get("rounds", []))))
    try:
        images = report_images(data_root)
    except (NotAFedscanStoreError, StoreNotFoundError):
        images = []
    path = write_report(
        root / "report.html", title="fedscan run report", sections=sections, images=images, failures=failures
    )
    from tasks.artifacts import in_prefect_run

    if in_prefect_run():  # outside a run there is no UI to link from
        from prefect.artifacts import create_link_artifact

        create_link_artifact(key="fedscan-run-report", link=path.resolve().as_uri(), description="HTML run report")
    return str(path)


def federated_sites(data_root: str, sites: Sequence[str] | None = None) -> list[str]:
    """Stores of the sites that have at least one scan with surrogates (the only input a client reads)."""
    ready = []
    for uri in site_uris(data_root, sites):
        site = SiteStore.open(uri, mode="r")
        if any(scan.is_done("surrogate") for scan in site.scans()):
            ready.append(uri)
    if not ready:
        raise InvalidInputError(f"no site under {data_root} has surrogates yet; run the pipeline first")
    from tasks.labels import require_labelled_sites  # logs labelled scans per site; refuses when no site has any

    require_labelled_sites(ready)
    return ready
