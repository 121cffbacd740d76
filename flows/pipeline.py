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
from schemas.settings import Device, get_settings
from tasks.cluster import dask_client
from tasks.device import resolve_device
from tasks.errors import InvalidInputError
from tasks.prefect_tasks import flush_artifacts, ingest_scan, run_logger, stage_tasks
from tasks.watch import check_arrival


class ScanOutcome(FrozenModel):
    """How one scan fared in a run."""

    scan: str = Field(description="site/scan")
    ok: bool
    failed_stage: str | None = None
    error: str | None = None


class PipelineReport(FrozenModel):
    """What a pipeline run did: per-scan outcomes, the report file and the federated run (if any)."""

    scans: tuple[ScanOutcome, ...]
    report_path: str | None = None
    federated: dict[str, object] | None = None

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


class NightlyRequest(FrozenModel):
    """Every unprocessed scan of every site (or of ``sites``), then a federated round."""

    data_root: str | None = Field(default=None, description="Folder of <site>.zarr stores; default from settings.")
    sites: tuple[str, ...] | None = Field(default=None, description="Only these sites (default: all).")
    config: PipelineConfig = Field(default_factory=PipelineConfig)
    federated: bool = Field(default=True, description="Run a federated round after the scans.")
    report: bool = Field(default=True, description="Write report.html next to the stores.")


@task(name="discover-scans", task_run_name="discover-scans")
def discover_scans(data_root: str, sites: tuple[str, ...] | None) -> list[ScanRef]:
    """Every ingested scan of the chosen sites (stages that are already done skip themselves)."""
    from tasks.pipeline_support import find_scans

    return find_scans(data_root, sites)


#: Scans in flight in a nightly run: the thread pool's size (one stage task per scan runs at a time).
NIGHTLY_SCANS_IN_FLIGHT = 2

_STAGE_NAMES = ("denoise", "reconstruct", "surrogate")


@contextlib.contextmanager
def _artifacts_flushed() -> Iterator[None]:
    """The stage tasks' artifacts are created in the background: wait for them before the flow goes on."""
    try:
        yield
    finally:
        flush_artifacts()


def with_settings_device(config: PipelineConfig, device: Device | str) -> PipelineConfig:
    """``config`` with the settings' device (``FEDSCAN_DEVICE``) for every stage whose own config names none.

    A stage config that sets ``device`` keeps it. For denoising and surrogates ``auto`` resolves here, once: to
    ``cuda`` where torch sees a GPU, else ``cpu``; ``cuda`` where there is none is refused before any scan starts.
    Reconstruction takes ``auto`` as it is (its config resolves it), so that the defaults' config hashes, and with
    them what earlier runs wrote, stay valid on a machine without a GPU.
    """
    stages = ("denoise", "reconstruct", "surrogate")
    takers = [name for name in stages if "device" not in getattr(config, name).model_fields_set]
    if not takers:  # every stage names its own device: the setting is not used
        return config
    request = Device(device).value
    resolved = resolve_device(request).type  # refuses "cuda" without CUDA
    updates: dict[str, object] = {}
    for name in takers:
        stage = getattr(config, name)
        value = request if name == "reconstruct" else resolved
        if stage.device != value:
            updates[name] = type(stage).model_validate({**stage.model_dump(), "device": value})
    return config.model_copy(update=updates) if updates else config


def _run_chains(
    refs: list[ScanRef], config: PipelineConfig, stages: tuple[Any, Any, Any], *, in_flight: int
) -> tuple[ScanOutcome, ...]:
    """Each scan's stages in order (``stages``: see :func:`~tasks.prefect_tasks.stage_tasks`), at most
    ``in_flight`` scans at a time; a failed stage stops its scan only.

    A stage is submitted when the one before it has finished (its finished future is the next stage's input, so
    the UI still draws the dependency). Submitting whole chains at once made a worker thread pick up a stage
    whose upstream was still running and sit blocked on it: with two workers, one scan at a time.
    """
    configs = (config.denoise, config.reconstruct, config.surrogate)
    finished: queue.SimpleQueue[PrefectFuture[ScanRef]] = queue.SimpleQueue()
    running: dict[PrefectFuture[ScanRef], tuple[str, int]] = {}
    outcomes: dict[str, ScanOutcome] = {}
    todo = [(str(ref), ref) for ref in refs]
    todo.reverse()

    def submit(name: str, stage: int, upstream: Any) -> None:
        fut = stages[stage].submit(upstream, configs[stage])
        running[fut] = (name, stage)
        fut.add_done_callback(finished.put)

    while todo or running:
        while todo and len(running) < in_flight:
            name, ref = todo.pop()
            submit(name, 0, ref)
        fut = finished.get()
        name, stage = running.pop(fut)
        fut.wait()  # already done: takes the final state from the thread, no API call
        state = fut.state
        if not state.is_completed():
            error = str(state.message or state.name)[:500]
            outcomes[name] = ScanOutcome(scan=name, ok=False, failed_stage=_STAGE_NAMES[stage], error=error)
        elif stage + 1 < len(stages):
            submit(name, stage + 1, fut)
        else:
            outcomes[name] = ScanOutcome(scan=name, ok=True)
    return tuple(outcomes[str(ref)] for ref in refs)


def _process_one(request: ProcessScanRequest) -> PipelineReport:
    """The body of :func:`process_scan` and :func:`on_scan_arrived`, run in the calling flow's run."""
    settings = get_settings()
    root = request.data_root or settings.data_root
    config = with_settings_device(request.config, settings.device)  # refused before a cluster or an ingest
    with dask_client(settings.dask), _artifacts_flushed():
        if request.source is not None:
            if request.site_id is None:
                raise ValueError("process-scan with a source needs site_id")
            ref: ScanRef = ingest_scan(request.source, site_id=request.site_id, data_root=root)
        elif request.scan is not None:
            ref = request.scan
        else:
            raise ValueError("process-scan needs a scan or a source")
        (outcome,) = _run_chains([ref], config, stage_tasks(), in_flight=1)
    if not outcome.ok:
        raise RuntimeError(f"scan {outcome.scan} failed in {outcome.failed_stage}: {outcome.error}")
    return PipelineReport(scans=(outcome,))


@flow(name="process-scan", task_runner=cast(Any, ThreadPoolTaskRunner(max_workers=1)))
def process_scan(request: ProcessScanRequest) -> PipelineReport:
    """Ingest (if given a source), denoise, reconstruct and make surrogates of one scan."""
    return _process_one(request)


@flow(
    name="on-scan-arrived",
    flow_run_name="scan-arrived-{site_id}",
    task_runner=cast(Any, ThreadPoolTaskRunner(max_workers=1)),
)
def on_scan_arrived(path: str, site_id: str, data_root: str | None = None) -> PipelineReport:
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
    return _process_one(ProcessScanRequest(source=source, site_id=site_id, data_root=data_root))


@flow(name="nightly", task_runner=cast(Any, ThreadPoolTaskRunner(max_workers=NIGHTLY_SCANS_IN_FLIGHT)))
def nightly(request: NightlyRequest) -> PipelineReport:
    """Every unprocessed scan of every site, in parallel (bounded), then a federated round; failures are
    recorded in the report and the other scans go on."""
    from tasks.pipeline_support import publish_run_report

    settings = get_settings()
    root = request.data_root or settings.data_root
    config = with_settings_device(request.config, settings.device)  # refused before a cluster starts
    with dask_client(settings.dask), _artifacts_flushed():
        refs = discover_scans(root, request.sites)
        outcomes = _run_chains(refs, config, stage_tasks(), in_flight=NIGHTLY_SCANS_IN_FLIGHT)
    federated = None
    if request.federated and any(o.ok for o in outcomes):
        from flows.federated import FederatedRequest, federated_training

        # Called directly, not via return_state: a subflow's state fetched back from the API carries no result
        # unless results are persisted (MissingResult, seen intermittently in the integration test).
        try:
            fed = federated_training(FederatedRequest(data_root=root, config=request.config.federation))
            federated = fed.model_dump(mode="json")
        except Exception as exc:  # recorded in the report; the scans' results stand
            federated = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:500], "rounds": []}
    report_path = publish_run_report(root, outcomes, federated) if request.report else None
    report = PipelineReport(scans=outcomes, report_path=report_path, federated=federated)
    if report.failed or (federated and federated.get("status") == "failed"):
        get_run_logger().error(
            "nightly finished with %d failed scans%s; see %s",
            len(report.failed),
            " and a failed federated run" if federated and federated.get("status") == "failed" else "",
            report_path or "the task logs",
        )
    return report
