"""Small pieces the flows need that touch stores or files: finding scans, known failures, the run report."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from schemas.base import FrozenModel, StageConfig
from schemas.refs import ScanRef
from schemas.stages import PIPELINE, StageName
from tasks.errors import (
    CorruptStoreError,
    FedscanError,
    InvalidInputError,
    NotAFedscanStoreError,
    StageIncompleteError,
    StoreNotFoundError,
)
from tasks.report import chance_note, line_plot_svg, render_report
from tasks.storage import ScanStore, SiteStore, find_site_stores, site_store_uri

if TYPE_CHECKING:
    from tasks.previews import Preview

logger = logging.getLogger("fedscan.pipeline")


def site_uris(data_root: str, sites: Sequence[str] | None = None) -> list[str]:
    """The stores of the named sites, or of every site store found under ``data_root``."""
    if sites:
        return [site_store_uri(data_root, s) for s in sites]
    return [str(p) for p in _stores(data_root)]


def _stores(data_root: str) -> list[str | Path]:
    """The site stores under a data root; a local folder that does not exist holds none."""
    if "://" not in data_root and not Path(data_root).is_dir():
        return []
    return find_site_stores(data_root)


class KnownFailure(FrozenModel):
    """A scan that failed a stage under the same inputs in an earlier run: skipped, listed once per run."""

    scan: str = Field(description="site/scan")
    stage: str
    since: str = Field(description="When it first failed under these inputs (UTC, ISO 8601).")
    error: str = ""


@dataclass
class Discovery:
    """What a night has to do: the scans with a stage left (``todo``), the scans skipped because their next
    stage already failed under the same inputs (``known_failures``), and how many scans were up to date."""

    todo: list[ScanRef] = field(default_factory=list)
    known_failures: list[KnownFailure] = field(default_factory=list)
    up_to_date: int = 0


def find_scans(
    data_root: str,
    sites: Sequence[str] | None = None,
    *,
    pending_for: Mapping[StageName, StageConfig] | None = None,
) -> list[ScanRef]:
    """Every scan whose ingest is complete, in the chosen sites' stores under ``data_root``; with
    ``pending_for`` (each stage's config), only the scans with a stage of their chain left to do under it."""
    if pending_for is None:
        return discover(data_root, sites).todo
    return discover(data_root, sites, pending_for, retry_known_failures=True).todo


def discover(
    data_root: str,
    sites: Sequence[str] | None = None,
    configs: Mapping[StageName, StageConfig] | None = None,
    *,
    retry_known_failures: bool = False,
) -> Discovery:
    """The ingested scans of the chosen sites under ``data_root`` (local folder or fsspec URL); with ``configs``,
    only those with a stage left to do under them, leaving out (as known failures) those whose next stage failed
    under the same config and inputs before, unless ``retry_known_failures``.

    A scan whose metadata cannot be read is returned too: its first stage then fails, naming the document, and
    the run reports that scan failed instead of silently leaving it out (the site's other scans go on)."""
    from tasks.stages import pending_stages

    found = Discovery()
    for uri in site_uris(data_root, sites):
        site = SiteStore.open(uri, mode="r")
        for scan_id in site.scan_ids():
            ref = ScanRef(store_uri=uri, site_id=site.site_id, scan_id=scan_id)
            try:
                scan = site.scan(scan_id)
                if not scan.is_done(StageName.INGEST):
                    continue
                if configs is not None:
                    pending = pending_stages(scan, configs)
                    if not pending:
                        found.up_to_date += 1
                        continue
                    known = None if retry_known_failures else _known_failure(scan, str(ref), pending[0], configs)
                    if known is not None:
                        found.known_failures.append(known)
                        continue
            except CorruptStoreError as exc:
                logger.warning("%s: %s; its stages will fail until it is repaired", ref, exc)
            found.todo.append(ref)
    return found


def failure_key(scan: ScanStore, stage: StageName, configs: Mapping[StageName, StageConfig]) -> str:
    """16 hex digits naming what ``stage`` of ``scan`` ran on: the stage's config hash and its input's lineage
    (which changes with any upstream config and with a re-ingest: the ingest record holds the source digest)."""
    from tasks.stages import disabled_stages, source_of

    spec = next(s for s in PIPELINE if s.name == stage)
    try:
        _, upstream = source_of(scan, spec, ignore=disabled_stages(configs))
        source = f"{upstream.stage}:{upstream.lineage()}"
    except StageIncompleteError:
        source = "-"
    canonical = json.dumps([stage.value, configs[stage].config_hash(), source], separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _known_failure(
    scan: ScanStore, name: str, stage: StageName, configs: Mapping[StageName, StageConfig]
) -> KnownFailure | None:
    marker = scan.failure()
    if marker is None or marker.get("stage") != stage.value or marker.get("key") != failure_key(scan, stage, configs):
        return None
    return KnownFailure(
        scan=name, stage=stage.value, since=str(marker.get("since", "")), error=str(marker.get("error", ""))
    )


def record_failures(refs: Sequence[ScanRef], outcomes: Sequence[Any], configs: Mapping[StageName, StageConfig]) -> None:
    """After a run: mark each scan that failed a stage for a reason in its data or config (not a transient one:
    a lease held elsewhere, an unreachable service) in its store, so the next night skips it until its inputs
    change; clear the mark of each scan that went through. A mark that cannot be written is logged, not raised."""
    now = datetime.now(UTC).isoformat(timespec="seconds")
    for ref, outcome in zip(refs, outcomes, strict=True):
        try:
            scan = SiteStore.open(ref.store_uri).scan(ref.scan_id)
            if outcome.ok:
                if scan.failure() is not None:
                    scan.set_failure(None)
                continue
            if getattr(outcome, "transient", False) or outcome.failed_stage is None:
                continue
            stage = StageName(outcome.failed_stage)
            key = failure_key(scan, stage, configs)
            old = scan.failure() or {}
            since = old["since"] if old.get("key") == key and old.get("stage") == stage.value else now
            scan.set_failure({"stage": stage.value, "key": key, "since": since, "error": (outcome.error or "")[:500]})
        except (FedscanError, OSError, ValueError) as exc:
            logger.warning("%s: could not record its failure marker: %s", ref, exc)


def stage_rows(data_root: str) -> list[dict[str, object]]:
    """One row per (scan, completed stage) from the stores' provenance records."""
    rows: list[dict[str, object]] = []
    for path in _stores(data_root):
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


def run_label(now: datetime | None = None) -> str:
    """``<UTC time>-<8 hex>``: the flow run's id inside a run (else random), so no two runs share a report."""
    from prefect.runtime import flow_run

    when = now or datetime.now(UTC)
    run_id = flow_run.get_id()
    return f"{when:%Y%m%dT%H%M%SZ}-{(str(run_id) if run_id else uuid.uuid4().hex).replace('-', '')[:8]}"


def report_summary(
    outcomes: Sequence[Any],
    federated: Mapping[str, Any] | None,
    *,
    known_failures: Sequence[KnownFailure] = (),
    up_to_date: int = 0,
) -> str:
    """The report's first line: scans processed / skipped / failed, and the federated result."""
    failed = sum(1 for o in outcomes if not o.ok)
    skipped = up_to_date + len(known_failures)
    line = (
        f"{len(outcomes) - failed} scans processed, {skipped} skipped "
        f"({up_to_date} up to date, {len(known_failures)} known failures), {failed} failed"
    )
    return f"{line}; federated: {_federated_summary(federated)}"


def _federated_summary(federated: Mapping[str, Any] | None) -> str:
    if not federated:
        return "not run"
    if federated.get("status") == "failed":
        return f"failed ({federated.get('error', '')})"
    rounds = _train_rounds(federated)
    text = f"{federated.get('status', '?')}, {len(rounds)} rounds"
    auc = _final_auc(rounds)
    return text + (f", final AUC {auc:.2f}" if auc is not None else "")


def _train_rounds(federated: Mapping[str, Any] | None) -> list[Mapping[str, Any]]:
    rounds = (federated or {}).get("rounds") or []
    return [r for r in rounds if isinstance(r, Mapping) and r.get("phase", "train") == "train"]


def _final_auc(rounds: Sequence[Mapping[str, Any]]) -> float | None:
    aucs = [r["eval_auc"] for r in rounds if isinstance(r.get("eval_auc"), int | float)]
    return float(aucs[-1]) if aucs else None


def _federated_plot(federated: Mapping[str, Any] | None) -> str | None:
    """AUC over rounds (with the chance line), or the training loss when no round has an AUC."""
    rounds = _train_rounds(federated)
    auc = [(float(r["round"]), float(r["eval_auc"])) for r in rounds if isinstance(r.get("eval_auc"), int | float)]
    if auc:
        return line_plot_svg(
            {"held-out AUC (mean over sites)": auc},
            title="Federated model: AUC over rounds",
            x_label="round",
            y_label="AUC",
            y_range=(0.0, 1.0),
            reference=(0.5, "chance"),
        )
    loss = [(float(r["round"]), float(r["train_loss"])) for r in rounds if isinstance(r.get("train_loss"), int | float)]
    if loss:
        return line_plot_svg(
            {"training loss": loss}, title="Federated model: loss over rounds", x_label="round", y_label="loss"
        )
    return None


def _scan_row(outcome: Any) -> dict[str, object]:
    """One scan's outcome: ok, each stage's state (one column per stage), and what failed."""
    row: dict[str, object] = {"scan": outcome.scan, "ok": "yes" if outcome.ok else "NO"}
    row.update(
        {str(name): str(getattr(state, "value", state)) for name, state in getattr(outcome, "stages", {}).items()}
    )
    if not outcome.ok:
        row["failed stage"] = outcome.failed_stage or ""
        row["error"] = outcome.error or ""
        if getattr(outcome, "transient", False):
            row["transient"] = "yes (not marked as a known failure)"
    return row


def _stage_times(outcomes: Sequence[Any], rows: Sequence[Mapping[str, object]]) -> list[dict[str, object]]:
    """Seconds per stage over the scans this run computed it for (from their provenance records)."""
    ran = {(o.scan, stage) for o in outcomes for stage, state in getattr(o, "stages", {}).items() if state == "done"}
    totals: dict[str, list[float]] = {}
    for row in rows:
        if (f"{row['site']}/{row['scan']}", row["stage"]) in ran and isinstance(row.get("seconds"), int | float):
            totals.setdefault(str(row["stage"]), []).append(float(row["seconds"]))  # type: ignore[arg-type]
    return [
        {"stage": stage, "scans": len(s), "total s": round(sum(s), 2), "mean s": round(sum(s) / len(s), 3)}
        for stage, s in totals.items()
    ]


def publish_run_report(
    data_root: str,
    outcomes: Sequence[Any],
    federated: Mapping[str, Any] | None,
    *,
    known_failures: Sequence[KnownFailure] = (),
    up_to_date: int = 0,
) -> str | None:
    """Write this run's site-only ``reports/report-<run>.html`` under the data root (never overwritten; the
    latest is also copied to ``report.html``) and, inside a run, a shareable summary in the UI: the summary
    line, the scans' outcomes, where the report is and the images the site's privacy policy lets leave
    (surrogates; plaintext only with ``FEDSCAN_PRIVACY__SHARE_IMAGES``). Returns the report's path or URL."""
    remote = "://" in data_root and not data_root.startswith("file://")
    if not remote and not Path(data_root.removeprefix("file://")).is_dir():
        return None
    from schemas.settings import get_settings
    from tasks.artifacts import in_prefect_run
    from tasks.previews import report_previews, shareable_previews

    rows = stage_rows(data_root)
    failures = [_scan_row(o) for o in outcomes if not o.ok]
    sections: list[tuple[str, Sequence[Mapping[str, object]]]] = [("Scans", [_scan_row(o) for o in outcomes])]
    if known_failures:
        sections.append(
            ("Still failing (skipped: same inputs as when they failed)", [k.model_dump() for k in known_failures])
        )
    sections.append(("Time per stage (this run)", _stage_times(outcomes, rows)))
    details: list[tuple[str, Sequence[Mapping[str, object]]]] = []
    if federated:
        details.append(("Federated rounds", list(federated.get("rounds", []))))
        if federated.get("skipped_sites"):  # e.g. enhance training: sites without projection scans
            sections.append(("Sites the federated run skipped", [{"site": x} for x in federated["skipped_sites"]]))
    details.append(("Stages (from the stores' provenance records)", rows))
    try:
        previews = report_previews(data_root) if not remote else []
        if not remote:
            from tasks.enhance.comparison import enhance_comparisons  # raw / classical / enhanced (plaintext)

            previews += enhance_comparisons(data_root)
    except (NotAFedscanStoreError, StoreNotFoundError):
        previews = []
    plot = _federated_plot(federated)
    note = chance_note(_final_auc(_train_rounds(federated)))
    summary = report_summary(outcomes, federated, known_failures=known_failures, up_to_date=up_to_date)
    bad = bool(failures) or bool(federated and federated.get("status") == "failed")
    text = render_report(
        title="fedscan run report",
        summary=summary,
        summary_bad=bad,
        sections=sections,
        plots=[plot] if plot else [],
        images=[(f"{p.title}. {p.caption}" if p.caption else p.title, p.png) for p in previews],  # PSNR vs truth
        failures=failures,
        notes=[SITE_ONLY_NOTE],
        warnings=[note] if note else [],
        details=details,
    )
    where = _write_reports(data_root.removeprefix("file://") if not remote else data_root, text)
    if in_prefect_run():  # outside a run there is no UI to show it in
        from prefect.artifacts import create_markdown_artifact

        shared = shareable_previews(previews, get_settings().privacy)
        create_markdown_artifact(
            key="fedscan-run-report",
            markdown=run_summary_markdown(where, outcomes, shared, summary=summary, known_failures=known_failures),
            description=summary,
        )
    return where


def _write_reports(root: str, text: str) -> str:
    """``reports/report-<run>.html`` (new each run) and ``report.html`` (the latest), each written whole: a
    temporary file renamed into place locally, one object PUT on object stores."""
    name = f"report-{run_label()}.html"
    if "://" in root:
        import fsspec

        base = root.rstrip("/")
        for url in (f"{base}/reports/{name}", f"{base}/report.html"):
            with fsspec.open(url, "w", encoding="utf-8") as f:
                f.write(text)
        return f"{base}/reports/{name}"
    folder = Path(root) / "reports"
    folder.mkdir(parents=True, exist_ok=True)
    for path in (folder / name, Path(root) / "report.html"):
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return str(folder / name)


#: The first line of report.html.
SITE_ONLY_NOTE = (
    "Site-only: this report shows plaintext slices of the site's scans. fedscan sends it nowhere; keep it at the site."
)


def run_summary_markdown(
    report: str | Path,
    outcomes: Sequence[Any],
    previews: Sequence[Preview],
    *,
    summary: str = "",
    known_failures: Sequence[KnownFailure] = (),
) -> str:
    """The run's summary artifact: the summary line, each scan's outcome, the scans still failing, where the
    site-only report of this run is, and ``previews`` (the caller passes only those its privacy policy lets
    leave)."""
    where = str(report)
    link = where if "://" in where else Path(where).resolve().as_uri()
    lines = [
        "### fedscan run",
        "",
        *([f"**{summary}**", ""] if summary else []),
        f"Site-only report of this run (plaintext previews; it stays with the data): [{link.rsplit('/', 1)[-1]}]"
        f"({link})",
        "",
        "| scan | ok | failed stage | error |",
        "|---|---|---|---|",
    ]
    for o in outcomes:
        lines.append(f"| {o.scan} | {o.ok} | {o.failed_stage or ''} | {_md(o.error)} |")
    if known_failures:
        lines += [
            "",
            "Still failing (skipped; same inputs as when they failed):",
            "",
            "| scan | stage | since | error |",
        ]
        lines.append("|---|---|---|---|")
        lines += [f"| {k.scan} | {k.stage} | {k.since} | {_md(k.error)} |" for k in known_failures]
    text = "\n".join(lines) + "\n"
    for preview in previews:
        text += "\n" + preview.markdown().replace("### ", "#### ", 1)
    return text


def _md(value: object) -> str:
    return str(value or "").replace("|", "\\|").replace("\n", " ")


def federated_sites(data_root: str, sites: Sequence[str] | None = None) -> list[str]:
    """Stores of the sites that have surrogates (the only input a client reads) and a labelled scan."""
    ready = []
    for uri in site_uris(data_root, sites):
        site = SiteStore.open(uri, mode="r")
        if any(scan.is_done(StageName.SURROGATE) for scan in site.scans()):
            ready.append(uri)
    if not ready:
        raise InvalidInputError(f"no site under {data_root} has surrogates yet; run the pipeline first")
    from tasks.labels import require_labelled_sites  # logs labelled scans per site; refuses when no site has any

    labelled = require_labelled_sites(ready)
    # a site without a labelled scan has nothing to train on: asked anyway, its client would fail every round
    return [uri for uri in ready if labelled.get(SiteStore.open(uri, mode="r").site_id)]
