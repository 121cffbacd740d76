"""Small pieces the flows need that touch stores or files: finding scans, the run report."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from schemas.base import StageConfig
from schemas.refs import ScanRef
from schemas.stages import StageName
from tasks.errors import CorruptStoreError, InvalidInputError, NotAFedscanStoreError, StoreNotFoundError
from tasks.report import write_report
from tasks.storage import SiteStore, find_site_stores, site_store_uri

if TYPE_CHECKING:
    from tasks.previews import Preview

logger = logging.getLogger("fedscan.pipeline")


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
    ``pending_for`` (each stage's config), only the scans with a stage of their chain left to do under it.

    A scan whose metadata cannot be read is returned too: its first stage then fails, naming the document, and
    the run reports that scan failed instead of silently leaving it out (the site's other scans go on)."""
    from tasks.stages import pending_stages

    refs = []
    for uri in site_uris(data_root, sites):
        site = SiteStore.open(uri, mode="r")
        for scan_id in site.scan_ids():
            ref = ScanRef(store_uri=uri, site_id=site.site_id, scan_id=scan_id)
            try:
                scan = site.scan(scan_id)
                if not scan.is_done(StageName.INGEST):
                    continue
                if pending_for is not None and not pending_stages(scan, pending_for):
                    continue
            except CorruptStoreError as exc:
                logger.warning("%s: %s; its stages will fail until it is repaired", ref, exc)
            refs.append(ref)
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
    """Write the site-only ``report.html`` next to the stores (local data roots only; it shows plaintext slices)
    and, inside a run, a shareable summary in the UI: the scans' outcomes, the report's path and the images the
    site's privacy policy lets leave (surrogates; plaintext only with ``FEDSCAN_PRIVACY__SHARE_IMAGES``)."""
    root = Path(data_root)
    if "://" in data_root or not root.is_dir():
        return None
    from schemas.settings import get_settings
    from tasks.artifacts import in_prefect_run
    from tasks.previews import report_previews, shareable_previews

    failures = [o.model_dump() for o in outcomes if not o.ok]
    sections: list[tuple[str, list[Mapping[str, object]]]] = [
        ("Scans", [o.model_dump() for o in outcomes]),
        ("Stages (from the stores' provenance records)", list(stage_rows(data_root))),
    ]
    if federated:
        sections.append(("Federated rounds", list(federated.get("rounds", []))))
        if federated.get("skipped_sites"):  # e.g. enhance training: sites without projection scans
            sections.append(("Sites the federated run skipped", [{"site": x} for x in federated["skipped_sites"]]))
    try:
        previews = report_previews(data_root)
        from tasks.enhance.comparison import enhance_comparisons  # raw / classical / enhanced (plaintext)

        previews += enhance_comparisons(data_root)
    except (NotAFedscanStoreError, StoreNotFoundError):
        previews = []
    path = write_report(
        root / "report.html",
        title="fedscan run report",
        sections=sections,
        images=[(p.title, p.png) for p in previews],
        failures=failures,
        notes=[SITE_ONLY_NOTE],
    )
    if in_prefect_run():  # outside a run there is no UI to show it in
        from prefect.artifacts import create_markdown_artifact

        shared = shareable_previews(previews, get_settings().privacy)
        create_markdown_artifact(
            key="fedscan-run-report",
            markdown=run_summary_markdown(path, outcomes, shared),
            description="Run summary: outcomes and shareable images; the full report stays at the site",
        )
    return str(path)


#: The first line of report.html.
SITE_ONLY_NOTE = (
    "Site-only: this report shows plaintext slices of the site's scans. fedscan sends it nowhere; keep it at the site."
)


def run_summary_markdown(report_path: Path, outcomes: Sequence[Any], previews: Sequence[Preview]) -> str:
    """The run's summary artifact: each scan's outcome, where the site-only report is, and ``previews`` (the
    caller passes only those its privacy policy lets leave)."""
    report_path = report_path.resolve()
    lines = [
        "### fedscan run",
        "",
        f"Site-only report (plaintext previews; it stays in the data root): [report.html]({report_path.as_uri()})",
        "",
        "| scan | ok | failed stage | error |",
        "|---|---|---|---|",
    ]
    for o in outcomes:
        error = str(o.error or "").replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {o.scan} | {o.ok} | {o.failed_stage or ''} | {error} |")
    text = "\n".join(lines) + "\n"
    for preview in previews:
        text += "\n" + preview.markdown().replace("### ", "#### ", 1)
    return text


def federated_sites(data_root: str, sites: Sequence[str] | None = None) -> list[str]:
    """Stores of the sites that have at least one scan with surrogates (the only input a client reads)."""
    ready = []
    for uri in site_uris(data_root, sites):
        site = SiteStore.open(uri, mode="r")
        if any(scan.is_done(StageName.SURROGATE) for scan in site.scans()):
            ready.append(uri)
    if not ready:
        raise InvalidInputError(f"no site under {data_root} has surrogates yet; run the pipeline first")
    from tasks.labels import require_labelled_sites  # logs labelled scans per site; refuses when no site has any

    require_labelled_sites(ready)
    return ready
