"""Prefect tasks: thin wrappers around the stage drivers. One task per stage per scan, never per chunk.

Tasks take and return small references (:class:`~schemas.refs.ScanRef`), never arrays. Retries happen
only for transient faults (:func:`is_transient`); bad input fails at once with its clear message.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.client.schemas.objects import TaskRun
from prefect.exceptions import MissingContextError
from prefect.states import State

from schemas.ingest import IngestSidecar
from schemas.refs import ScanRef, StageReport
from tasks.errors import AlreadyIngestedError, TransientError
from tasks.storage import SiteStore, StageResult, site_store_uri


def run_logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """The Prefect run logger inside a run; a plain logger when called as ``task.fn()`` (tests, scripts)."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("fedscan")


def is_transient(exc: BaseException) -> bool:
    """Faults worth retrying: our TransientError, a lost Dask worker, a dropped connection."""
    if isinstance(exc, TransientError | ConnectionError | TimeoutError):
        return True
    name = type(exc).__name__
    return name in {"KilledWorker", "CommClosedError", "FutureCancelledError"}


def retry_only_transient(task_: Any, task_run: TaskRun, state: State[Any]) -> bool:
    """``retry_condition_fn``: continue to the retry policy only for transient faults."""
    try:
        state.result()
    except Exception as exc:
        return is_transient(exc)
    return False


def stage_report(scan: ScanRef, stage: str, result: StageResult) -> StageReport:
    rec = result.record
    metrics = {k: v for k, v in rec.metrics.items() if k not in {"seconds", "chunks_written", "chunks_resumed"}}
    return StageReport(
        scan=scan,
        stage=stage,
        skipped=result.skipped,
        config_hash=rec.config_hash,
        seconds=rec.seconds,
        chunks_written=result.chunks_written,
        chunks_resumed=result.chunks_present,
        metrics=metrics,
    )


@task(
    name="ingest",
    task_run_name="ingest-{site_id}-{source.name}",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_only_transient,
)
def ingest_scan(source: Path, *, site_id: str, data_root: str, sidecar: IngestSidecar | None = None) -> ScanRef:
    """Validate one scanner output and write it into its site's store."""
    from tasks.ingest import ingest

    logger = run_logger()
    site = SiteStore.open_or_create(site_store_uri(data_root, site_id), site_id=site_id)
    try:
        res = ingest(source, site=site, sidecar=sidecar)
    except AlreadyIngestedError as exc:
        logger.info("source already ingested as scan %s; nothing written", exc.scan_id)
        return ScanRef(store_uri=site.uri, site_id=site_id, scan_id=exc.scan_id)
    logger.info(
        "ingested scan %s: %d chunks written, %d resumed",
        res.scan_id,
        res.result.chunks_written,
        res.result.chunks_present,
    )
    return ScanRef(store_uri=site.uri, site_id=site_id, scan_id=res.scan_id)
