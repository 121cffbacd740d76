"""Prefect tasks: thin wrappers around the stage drivers. One task per stage per scan, never per chunk.

Tasks take and return small references (:class:`~schemas.refs.ScanRef`), never arrays. Retries happen
only for transient faults (:func:`is_transient`); bad input fails at once with its clear message.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import UUID

from prefect import get_run_logger, task
from prefect.client.schemas.objects import TaskRun
from prefect.exceptions import MissingContextError
from prefect.states import State

from schemas.base import FrozenModel, StageConfig
from schemas.ids import IdKind, validate_id
from schemas.ingest import IngestSidecar
from schemas.refs import ScanRef, StageReport
from schemas.stages import PIPELINE, StageName, StageState
from tasks.errors import AlreadyIngestedError, InvalidInputError, TransientError
from tasks.storage import ScanStore, SiteStore, StageResult, site_store_uri

if TYPE_CHECKING:
    from tasks.previews import Preview


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
    task_run_name="ingest-{site_id}",  # never the file name: it may identify a patient
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_only_transient,
)
def ingest_scan(source: Path, *, site_id: str, data_root: str, sidecar: IngestSidecar | None = None) -> ScanRef:
    """Validate one scanner output and write it into its site's store."""
    from tasks.ingest import ingest

    logger = run_logger()
    validate_id(IdKind.SITE, site_id, error=InvalidInputError)
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


# ------------------------------------------------------------------------------------------------
# Stage tasks: (ScanRef, config) -> StageReport. Artifacts: a metrics table and, where useful, one image.
# ------------------------------------------------------------------------------------------------
#: The tag an operator limits stage concurrency with: ``prefect concurrency-limit create fedscan-stage 2``.
STAGE_TAG = "fedscan-stage"

#: Every stage task: two retries with backoff, for transient faults only. The tag is added per run by
#: :func:`stage_tasks`, only when a limit on it exists (see there).
STAGE_TASK_OPTIONS: dict[str, Any] = {
    "retries": 2,
    "retry_delay_seconds": [5, 30],
    "retry_condition_fn": retry_only_transient,
}


class ArtifactPublisher:
    """Artifact API calls made off the stage's critical path, in order, on one background thread.

    Each artifact is an HTTP round trip to the API (about 0.04-0.1 s against a local SQLite server, measured
    with ``benchmarks/pipeline.py``), three per scan (one per stage); made inline they delay every scan's next
    stage. The calls run in a copy of the caller's context (so Prefect attaches them to the caller's task run), in
    submission order; :meth:`flush` waits for them and logs any that failed (an artifact never fails a stage).
    Flows call :func:`flush_artifacts` before they return.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedscan-artifacts")
        self._lock = threading.Lock()
        self._pending: list[Future[Any]] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> None:
        ctx = contextvars.copy_context()
        fut = self._pool.submit(ctx.run, fn, *args, **kwargs)
        with self._lock:
            self._pending = [f for f in self._pending if not f.done() or f.exception() is not None]
            self._pending.append(fut)

    def flush(self, timeout_s: float = 120.0) -> int:
        """Wait for every call submitted so far; returns how many failed (each logged)."""
        with self._lock:
            pending, self._pending = self._pending, []
        failed = 0
        for fut in pending:
            try:
                fut.result(timeout=timeout_s)
            except Exception as exc:  # the UI misses one artifact; the run's work stands
                failed += 1
                run_logger().warning("an artifact could not be created: %s: %s", type(exc).__name__, exc)
        return failed


_PUBLISHER = ArtifactPublisher()


def publish_soon(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> None:
    """Make an artifact API call in the background (see :class:`ArtifactPublisher`)."""
    _PUBLISHER.submit(fn, *args, **kwargs)


def flush_artifacts() -> int:
    """Wait for the background artifact calls of this process; returns how many failed."""
    return _PUBLISHER.flush()


class StageProgress:
    """A stage's progress bar in the UI: a progress artifact, created only once the stage has run for
    ``after_s`` seconds (short stages make no API calls) and updated at most every ``every_s`` seconds.

    Called with the fraction done (0–1) from :meth:`tasks.storage.ScanStore.run_stage`; the API calls go
    through ``publish`` (:func:`publish_soon` by default), never inline.
    """

    def __init__(
        self,
        description: str,
        *,
        after_s: float,
        every_s: float,
        clock: Callable[[], float] = time.monotonic,
        publish: Callable[..., None] | None = None,
    ) -> None:
        self.description = description
        self.after_s, self.every_s = after_s, every_s
        self._clock = clock
        self._publish = publish or publish_soon
        self._start = clock()
        self._last: float | None = None  # when the artifact was last published; None: not created yet
        self._artifact_id: UUID | None = None

    @property
    def created(self) -> bool:
        return self._last is not None

    def __call__(self, fraction: float) -> None:
        now = self._clock()
        percent = round(100.0 * min(max(fraction, 0.0), 1.0), 1)
        if self._last is None:
            if now - self._start < self.after_s:
                return
            self._last = now
            self._publish(self._create, percent)
            return
        if percent < 100.0 and now - self._last < self.every_s:
            return
        self._last = now
        self._publish(self._update, percent)

    def _create(self, percent: float) -> None:
        from prefect.artifacts import create_progress_artifact

        created = create_progress_artifact(progress=percent, description=self.description)
        self._artifact_id = created if isinstance(created, UUID) else None

    def _update(self, percent: float) -> None:
        from prefect.artifacts import update_progress_artifact

        if self._artifact_id is not None:  # created earlier on the same (ordered) thread
            update_progress_artifact(self._artifact_id, percent)


def stage_progress(ref: ScanRef, stage: str) -> Callable[[float], None] | None:
    """The progress reporter of a stage task (None outside a run: nothing to show it in)."""
    from schemas.settings import get_settings
    from tasks.artifacts import in_prefect_run

    if not in_prefect_run():
        return None
    settings = get_settings().prefect
    return StageProgress(
        f"{stage} of scan {ref}: chunks written",
        after_s=settings.progress_after_s,
        every_s=settings.progress_every_s,
    )


def _open_scan(ref: ScanRef) -> ScanStore:
    return SiteStore.open(ref.store_uri).scan(ref.scan_id)


def _publish(report: StageReport, preview: Callable[[], Preview | None] | None = None) -> None:
    """Log one line and attach the stage's card (its metrics table and, for stages that have one, the image
    ``preview()`` renders, when the site's privacy policy lets it leave: :func:`tasks.previews.publishable`;
    only inside a run) to the task run in the UI: one artifact per stage."""
    from prefect.artifacts import create_markdown_artifact

    from schemas.settings import get_settings
    from tasks.artifacts import artifact_key, in_prefect_run, stage_card
    from tasks.previews import publishable

    logger = run_logger()
    logger.info(
        "%s %s: %s in %.2f s (%d chunks written, %d resumed)",
        report.stage,
        report.scan,
        "skipped (done, same config)" if report.skipped else "done",
        report.seconds,
        report.chunks_written,
        report.chunks_resumed,
    )
    if not in_prefect_run():  # called as task.fn() outside a run: nothing to attach to
        return
    image = publishable(preview(), get_settings().privacy) if preview is not None else None
    publish_soon(
        create_markdown_artifact,
        markdown=stage_card(report, image.markdown() if image is not None else None),
        key=artifact_key(report.stage, report.scan.site_id, report.scan.scan_id),
        description=f"{report.stage} of scan {report.scan}" + (": metrics and central slice" if image else ""),
    )


class StageOutcome(FrozenModel):
    """What one stage task did to one scan (the flow chains the next stage on it)."""

    scan: ScanRef
    stage: StageName
    state: StageState


def _previews() -> dict[StageName, tuple[bool, Callable[[ScanStore], Preview | None]]]:
    """Each stage's card image: (is it plaintext, how to draw it from stored arrays)."""
    from tasks.diagnose.driver import diagnose_preview
    from tasks.previews import reconstruction_preview, surrogate_preview

    return {
        StageName.RECONSTRUCT: (True, reconstruction_preview),
        StageName.SURROGATE: (False, surrogate_preview),
        StageName.DIAGNOSE: (False, diagnose_preview),  # flagged surrogate slices and their scores
    }


@task(name="stage", task_run_name="{stage}-{ref.site_id}-{ref.scan_id}", **STAGE_TASK_OPTIONS)
def scan_stage(
    ref: ScanRef, stage: StageName, config: StageConfig, device: str, disabled: tuple[str, ...] = ()
) -> StageOutcome:
    """One stage of one scan (the registry's driver), skipped when done, recorded not-applicable when the scan's
    data kind has nothing for it, disabled when its config turns it off."""
    import torch

    from schemas.settings import get_settings
    from tasks.stages import run_scan_stage

    scan = _open_scan(ref)
    run = run_scan_stage(
        scan, stage, config, device=torch.device(device), progress=stage_progress(ref, stage), disabled=disabled
    )
    if run.result is None:
        run_logger().info("%s %s: %s (%s scan)", stage, ref, run.state.value, scan.manifest.data_kind.value)
    else:
        plaintext, draw = _previews().get(StageName(stage), (False, None))
        wanted = draw is not None and (not plaintext or get_settings().privacy.share_images)  # never drawn to drop
        _publish(stage_report(ref, stage, run.result), (lambda: draw(scan)) if wanted and draw else None)
    return StageOutcome(scan=ref, stage=StageName(stage), state=run.state)


@task(
    name="federated-round",
    task_run_name="federated-{config.strategy}-{config.num_rounds}-rounds",
    retries=1,
    retry_delay_seconds=30,
    retry_condition_fn=retry_only_transient,
)
def federated_stage(site_stores: list[str], config: Any, output_dir: str, initial_model: str = "") -> Any:
    """One Flower run across the sites (from ``initial_model`` when warm-starting): per-round metrics stream into
    the logs and a table artifact."""
    from prefect.artifacts import create_table_artifact

    from schemas.settings import get_settings
    from tasks.artifacts import artifact_key, in_prefect_run
    from tasks.federated.runner import DeploymentTarget, SimulationTarget, run_federation

    logger = run_logger()
    flower = get_settings().flower
    target: SimulationTarget | DeploymentTarget
    if flower.superlink_address:
        target = DeploymentTarget(superlink=flower.superlink_address, root_certificates=flower.root_certificates)
    else:
        target = SimulationTarget(site_stores=site_stores)
    rounds: list[dict[str, object]] = []

    def on_round(rec: Any) -> None:
        row = {
            "round": rec.round,
            "phase": rec.phase,
            "aggregated": rec.aggregated,
            "replies_ok": rec.replies_ok,
            "replies_failed": rec.replies_failed,
            "replies_rejected": rec.replies_rejected,
            "train_loss": rec.train_loss,
            "eval_auc": rec.eval_auc,
            "eval_accuracy": rec.eval_accuracy,
            "eval_psnr_db": rec.eval_psnr_db,
            "bytes_up": rec.bytes_up,
            "bytes_down": rec.bytes_down,
            "seconds": round(rec.seconds, 2),
            "failed_sites": ", ".join(f"{f.site} ({f.phase}: {f.reason.value})" for f in rec.failures),
        }
        rounds.append(row)
        for f in rec.failures:
            logger.warning("round %s: site %s dropped (%s): %s: %s", rec.round, f.site, f.phase, f.reason, f.detail)
        logger.info(
            "round %s (%s): %d ok, %d failed, %d rejected; AUC %s, %d bytes up",
            rec.round,
            rec.phase,
            rec.replies_ok,
            rec.replies_failed,
            rec.replies_rejected,
            rec.eval_auc,
            rec.bytes_up,
        )
        if in_prefect_run():
            create_table_artifact(
                table=rows_for_table(rounds),
                key=artifact_key("federated", "rounds"),
                description=f"Federated rounds so far ({config.strategy})",
            )

    report = run_federation(
        config, target=target, output_dir=output_dir, on_round=on_round, initial_model=initial_model
    )
    logger.info(
        "federated run %s: %s, %d rounds, %.1f s", report.run_id, report.status, len(report.rounds), report.wall_seconds
    )
    return report


def rows_for_table(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    return [{k: ("" if v is None else v) for k, v in r.items()} for r in rows]


def stage_limit_exists(tag: str = STAGE_TAG) -> bool:
    """Whether the Prefect API holds a concurrency limit on ``tag`` (one request). When it cannot tell, True."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            client.read_concurrency_limit_by_tag(tag)
    except ObjectNotFound:
        return False
    except Exception:  # API unreachable or unexpected answer: keep the tag, as the engine itself would
        return True
    return True


def stage_tasks(*, tagged: bool | None = None) -> dict[StageName, Any]:
    """The stage task of every stage of the registry, for one flow run: named after its stage in the UI, and
    tagged ``fedscan-stage`` only when a limit on that tag exists (``tagged=None``: ask the API once).

    Prefect asks the API for a slot on every run of a tagged task, whether or not a limit exists: one round trip
    per stage per scan (0.1 to 2 s each on a loaded server here, the largest part of the orchestration overhead
    in ``benchmarks/pipeline.py``). One request per flow run replaces them when there is no limit; when there
    is one, every stage run takes its slot as before. A limit created while a run is going applies from the
    next run on.
    """
    if tagged is None:
        tagged = stage_limit_exists(STAGE_TAG)
    tags = {STAGE_TAG} if tagged else set()
    return {spec.name: scan_stage.with_options(name=spec.name.value, tags=tags) for spec in PIPELINE}
