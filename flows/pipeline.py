"""Prefect flows that read like the pipeline: ingest → denoise → reconstruct → surrogate, per scan and nightly."""

from __future__ import annotations

import contextlib
import queue
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

from prefect import flow, get_run_logger, task
from prefect.futures import PrefectFuture
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import Field

from schemas.base import FrozenModel
from schemas.ids import SiteId
from schemas.pipeline import PipelineConfig
from schemas.refs import ScanRef
from schemas.settings import get_settings
from schemas.stages import PIPELINE, StageState
from tasks.cluster import dask_client
from tasks.device import resolve_device
from tasks.errors import InvalidInputError, TransientError
from tasks.pipeline_support import Discovery, KnownFailure
from tasks.prefect_tasks import StageOutcome, flush_artifacts, ingest_scan, run_logger, stage_tasks
from tasks.stages import disabled_stages
from tasks.watch import check_arrival


class ScanOutcome(FrozenModel):
    """How one scan fared in a run."""

    scan: str = Field(description="site/scan")
    ok: bool
    failed_stage: str | None = None
    error: str | None = None
    stages: dict[str, StageState] = Field(
        default_factory=dict, description="Each pipeline stage's state for this scan, in pipeline order."
    )
    transient: bool = Field(default=False, description="Failed for a transient reason (a lease, a service).")


class PipelineReport(FrozenModel):
    """What a pipeline run did: per-scan outcomes, the report file and the federated run (if any)."""

    scans: tuple[ScanOutcome, ...]
    report_path: str | None = None
    federated: dict[str, object] | None = None
    known_failures: tuple[KnownFailure, ...] = Field(
        default=(), description="Scans skipped: their next stage failed before under the same inputs."
    )
    summary: str | None = Field(default=None, description="The run report's first line.")

    @property
    def failed(self) -> list[ScanOutcome]:
        return [s for s in self.scans if not s.ok]

    @property
    def federated_failed(self) -> bool:
        return bool(self.federated and self.federated.get("status") == "failed")


class ProcessScanRequest(FrozenModel):
    """One scan: either already in a store (``scan``) or a scanner output to ingest first (``source``)."""

    scan: ScanRef | None = None
    source: Path | None = None
    site_id: SiteId | None = Field(default=None, description="Site of ``source``.")
    data_root: str | None = Field(default=None, description="Where the site stores live; default from settings.")
    config: PipelineConfig = Field(default_factory=PipelineConfig)
    config_path: str | None = Field(default=None, description="A pipeline config file; replaces ``config``.")


class NightlyRequest(FrozenModel):
    """Every unprocessed scan of every site (or of ``sites``), then a federated round."""

    data_root: str | None = Field(default=None, description="Folder of <site>.zarr stores; default from settings.")
    sites: tuple[str, ...] | None = Field(default=None, description="Only these sites (default: all).")
    config: PipelineConfig = Field(default_factory=PipelineConfig)
    config_path: str | None = Field(
        default=None, description="A pipeline config file (configs/pipeline.yaml's format); replaces ``config``."
    )
    federated: bool = Field(default=True, description="Run a federated round after the scans.")
    report: bool = Field(default=True, description="Write report.html next to the stores.")
    retry_known_failures: bool = Field(
        default=False, description="Retry scans that failed before under the same inputs (default: list them)."
    )


class PipelineFailedError(RuntimeError):
    """A run that finished with failed scans or a failed federated run: the flow run ends Failed (red in the UI)
    and the report of everything it did travels with the error."""

    def __init__(self, message: str, report: PipelineReport | None = None) -> None:
        super().__init__(message)
        self.report = report

    def __reduce__(self) -> tuple[type[PipelineFailedError], tuple[str, PipelineReport | None]]:
        return (type(self), (str(self), self.report))


@task(name="discover-scans", task_run_name="discover-scans")
def discover_scans(
    data_root: str, sites: tuple[str, ...] | None, config: PipelineConfig, retry_known_failures: bool = False
) -> Discovery:
    """The ingested scans of the chosen sites with a stage of their chain still to do under this config (a read
    of each scan's provenance records; a night with nothing new starts no stage task), less those that already
    failed that stage under the same inputs (listed as known failures)."""
    from tasks.pipeline_support import discover

    configs = {spec.name: config.stage_config(spec.name) for spec in PIPELINE}
    return discover(data_root, sites, configs, retry_known_failures=retry_known_failures)


def _failure_message(report: PipelineReport) -> str | None:
    """One line naming what failed, or None when nothing did."""
    parts = [f"{o.scan} in {o.failed_stage}" for o in report.failed]
    if report.federated_failed:
        parts.append(f"federated run: {(report.federated or {}).get('error', 'failed')}")
    if not parts:
        return None
    return f"{len(report.failed)} of {len(report.scans)} scans failed: " + "; ".join(parts)


def _publish_summary(report: PipelineReport, flow_name: str) -> None:
    """The run's outcome as a Prefect table artifact (each run adds a version; none is overwritten)."""
    from prefect.artifacts import create_table_artifact

    from tasks.artifacts import in_prefect_run

    if not in_prefect_run():
        return
    rows: list[dict[str, object]] = [
        {
            "scan": o.scan,
            "ok": o.ok,
            **{name: state.value for name, state in o.stages.items()},
            "failed_stage": o.failed_stage or "",
            "error": o.error or "",
        }
        for o in report.scans
    ]
    rows += [  # reported once per run, not as new failures: the run that first saw them was red
        {"scan": k.scan, "ok": False, "failed_stage": k.stage, "error": f"known failure since {k.since}: {k.error}"}
        for k in report.known_failures
    ]
    failed = len(report.failed)
    create_table_artifact(
        table=rows or [{"scan": "(no scan had a stage left to do)"}],
        key=f"{flow_name}-outcomes",
        description=(report.summary or f"{flow_name}: {len(report.scans) - failed} scans ok, {failed} failed")
        + (f"; site-only report {report.report_path}" if report.report_path else ""),
    )


def _finish(report: PipelineReport, flow_name: str) -> PipelineReport:
    """Publish the summary; a run with any failure raises, so that its flow run ends Failed."""
    _publish_summary(report, flow_name)
    message = _failure_message(report)
    if message is not None:
        get_run_logger().error("%s: %s; see %s", flow_name, message, report.report_path or "the task logs")
        raise PipelineFailedError(message, report)
    return report


#: Scans in flight in a nightly run: the thread pool's size (one stage task per scan runs at a time).
NIGHTLY_SCANS_IN_FLIGHT = 2


@contextlib.contextmanager
def _artifacts_flushed() -> Iterator[None]:
    """The stage tasks' artifacts are created in the background: wait for them before the flow goes on."""
    try:
        yield
    finally:
        flush_artifacts()


def resolve_run(config: PipelineConfig, config_path: str | None) -> tuple[PipelineConfig, str]:
    """The run's config (``config_path`` wins over ``config``) and its device: the config's ``device``, else
    ``FEDSCAN_DEVICE``, resolved once (``auto``: CUDA where torch sees a GPU). ``cuda`` without a GPU is refused
    here, before a cluster starts or a scan is ingested."""
    if config_path is not None:
        config = PipelineConfig.from_yaml(config_path)
    request = config.device if config.device is not None else get_settings().device
    return config, resolve_device(request).type


def _run_chains(refs: list[ScanRef], config: PipelineConfig, device: str, *, in_flight: int) -> tuple[ScanOutcome, ...]:
    """Each scan's chain of the registry's stages, in order, at most ``in_flight`` scans at a time; a failed
    stage stops its scan only; a stage that does not apply to the scan's data kind is recorded not-applicable.

    A stage is submitted when the one before it has finished (its future is the next stage's ``wait_for``, so
    the UI still draws the dependency). Submitting whole chains at once made a worker thread pick up a stage
    whose upstream was still running and sit blocked on it: with two workers, one scan at a time.
    """
    tasks = stage_tasks()
    order = [spec.name for spec in PIPELINE]
    disabled = tuple(sorted(disabled_stages({name: config.stage_config(name) for name in order})))
    finished: queue.SimpleQueue[PrefectFuture[StageOutcome]] = queue.SimpleQueue()
    running: dict[PrefectFuture[StageOutcome], tuple[ScanRef, int]] = {}
    states: dict[str, dict[str, StageState]] = {str(ref): {} for ref in refs}
    outcomes: dict[str, ScanOutcome] = {}
    todo = list(reversed(refs))

    def submit(ref: ScanRef, k: int, upstream: PrefectFuture[StageOutcome] | None) -> None:
        name = order[k]
        fut = tasks[name].submit(
            ref,
            name,
            config.stage_config(name),
            device,
            disabled,
            wait_for=[upstream] if upstream is not None else None,
        )
        running[fut] = (ref, k)
        fut.add_done_callback(finished.put)

    while todo or running:
        while todo and len(running) < in_flight:
            submit(todo.pop(), 0, None)
        fut = finished.get()
        ref, k = running.pop(fut)
        fut.wait()  # already done: takes the final state from the thread, no API call
        state = fut.state
        key = str(ref)
        if not state.is_completed():
            states[key][order[k]] = StageState.FAILED
            states[key].update({name: StageState.NOT_RUN for name in order[k + 1 :]})
            error = str(state.message or state.name)[:500]
            outcomes[key] = ScanOutcome(
                scan=key,
                ok=False,
                failed_stage=order[k].value,
                error=error,
                stages=states[key],
                transient=_is_transient(state),
            )
            continue
        states[key][order[k]] = cast(StageOutcome, state.result()).state
        if k + 1 < len(order):
            submit(ref, k + 1, fut)
        else:
            outcomes[key] = ScanOutcome(scan=key, ok=True, stages=states[key])
    return tuple(outcomes[str(ref)] for ref in refs)


def _is_transient(state: Any) -> bool:
    """Whether a failed stage's exception is a :class:`TransientError` (a lease held elsewhere, a service down)."""
    try:
        return isinstance(state.result(raise_on_failure=False), TransientError)
    except Exception:  # the exception is not at hand (e.g. a result never persisted): treat it as data
        return False


def _merge_outcomes(first: tuple[ScanOutcome, ...], again: tuple[ScanOutcome, ...]) -> tuple[ScanOutcome, ...]:
    """One outcome per scan: a second pass's stage states (and failure) over the first's, except where the second
    pass only skipped what the first one did (``done`` in the first pass stays ``done``)."""
    merged = {o.scan: o for o in first}
    for o in again:
        before = merged.get(o.scan)
        stages = dict(before.stages if before else {})
        stages.update({k: v for k, v in o.stages.items() if v is not StageState.SKIPPED or k not in stages})
        ok = o.ok and (before.ok if before else True)
        merged[o.scan] = o.model_copy(update={"stages": stages, "ok": ok}) if before is None or before.ok else before
    return tuple(merged.values())


def _process_one(request: ProcessScanRequest) -> PipelineReport:
    """The body of :func:`process_scan` and :func:`on_scan_arrived`, run in the calling flow's run."""
    settings = get_settings()
    root = request.data_root or settings.data_root
    config, device = resolve_run(request.config, request.config_path)  # refused before a cluster or an ingest
    with dask_client(settings.dask), _artifacts_flushed():
        if request.source is not None:
            if request.site_id is None:
                raise ValueError("process-scan with a source needs site_id")
            ref: ScanRef = ingest_scan(request.source, site_id=request.site_id, data_root=root)
        elif request.scan is not None:
            ref = request.scan
        else:
            raise ValueError("process-scan needs a scan or a source")
        (outcome,) = _run_chains([ref], config, device, in_flight=1)
    report = PipelineReport(scans=(outcome,))
    if not outcome.ok:
        raise PipelineFailedError(f"scan {outcome.scan} failed in {outcome.failed_stage}: {outcome.error}", report)
    return report


@flow(name="process-scan", task_runner=cast(Any, ThreadPoolTaskRunner(max_workers=1)))
def process_scan(request: ProcessScanRequest) -> PipelineReport:
    """Ingest (if given a source), denoise, reconstruct and make surrogates of one scan."""
    return _process_one(request)


@flow(
    name="on-scan-arrived",
    flow_run_name="scan-arrived-{site_id}",
    task_runner=cast(Any, ThreadPoolTaskRunner(max_workers=1)),
)
def on_scan_arrived(
    path: str, site_id: str, data_root: str | None = None, config_path: str | None = None
) -> PipelineReport:
    """Started by the ``fedscan.scan.arrived`` event: process the one scan that landed.

    The payload is checked first (:func:`~tasks.watch.check_arrival`): a safe site id, a path inside the incoming
    folder (``FEDSCAN_INCOMING``); a refused payload is logged and fails the run before anything is created.

    The stage tasks run in this flow's own run, not in a ``process-scan`` subflow: each flow run costs the API
    calls of its creation and states, and Prefect's teardown waits up to a second for the run's heartbeat
    thread (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``, on by default since Prefect 3.7), per run and per scan.
    """
    settings = get_settings()
    try:
        source = check_arrival(path, site_id, incoming=settings.incoming, data_root=data_root or settings.data_root)
    except InvalidInputError as exc:
        run_logger().error("%s", exc)
        raise
    return _process_one(
        ProcessScanRequest(source=source, site_id=site_id, data_root=data_root, config_path=config_path)
    )


@flow(name="nightly", task_runner=cast(Any, ThreadPoolTaskRunner(max_workers=NIGHTLY_SCANS_IN_FLIGHT)))
def nightly(request: NightlyRequest) -> PipelineReport:
    """Every scan with a stage left to do, in parallel (bounded), then a federated round. A failed scan stops
    only itself; the run then ends Failed, naming the failures, with the whole report attached."""
    from tasks.pipeline_support import publish_run_report, record_failures, report_summary

    settings = get_settings()
    root = request.data_root or settings.data_root
    config, device = resolve_run(request.config, request.config_path)  # refused before a cluster starts
    with dask_client(settings.dask), _artifacts_flushed():
        found = discover_scans(root, request.sites, config, request.retry_known_failures)
        outcomes = _run_chains(found.todo, config, device, in_flight=NIGHTLY_SCANS_IN_FLIGHT)
    record_failures(found.todo, outcomes, {spec.name: config.stage_config(spec.name) for spec in PIPELINE})
    for known in found.known_failures:
        get_run_logger().warning(
            "%s: still failing in %s since %s (same inputs; skipped)", known.scan, known.stage, known.since
        )
    federated = None
    from tasks.continual import has_training_data

    # labels may arrive for scans with nothing left to process: with no scan run, the federated flow still decides
    if request.federated and (any(o.ok for o in outcomes) or (not outcomes and has_training_data(root, request.sites))):
        from flows.federated import FederatedRequest, federated_training

        # Called directly, not via return_state: a subflow's state fetched back from the API carries no result
        # unless results are persisted (MissingResult, seen intermittently in the integration test).
        try:
            fed = federated_training(FederatedRequest(data_root=root, config=config.federation))
            federated = fed.model_dump(mode="json")
        except Exception as exc:  # recorded in the report; the scans' results stand
            federated = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:500], "rounds": []}
        fed_model = (federated or {}).get("model")
        if isinstance(fed_model, dict) and fed_model.get("outcome") == "promoted":
            # a newly promoted model: every scan's diagnose stage is pending again (its config names the model)
            with dask_client(settings.dask), _artifacts_flushed():
                again_found = discover_scans(root, request.sites, config, request.retry_known_failures)
                again = _run_chains(again_found.todo, config, device, in_flight=NIGHTLY_SCANS_IN_FLIGHT)
            record_failures(again_found.todo, again, {spec.name: config.stage_config(spec.name) for spec in PIPELINE})
            outcomes = _merge_outcomes(outcomes, again)
    report_path = (
        publish_run_report(root, outcomes, federated, known_failures=found.known_failures, up_to_date=found.up_to_date)
        if request.report
        else None
    )
    summary = report_summary(outcomes, federated, known_failures=found.known_failures, up_to_date=found.up_to_date)
    report = PipelineReport(
        scans=outcomes,
        report_path=report_path,
        federated=federated,
        known_failures=tuple(found.known_failures),
        summary=summary,
    )
    return _finish(report, "nightly")
