"""The stage registry: each stage of :data:`schemas.stages.PIPELINE` bound to its driver, and the one place that
decides whether a stage of a scan runs, is skipped (done) or does not apply.

A driver builds its Dask graph and writes through :meth:`~tasks.storage.ScanStore.run_stage`; it never asks
whether it is done itself: :func:`run_scan_stage` asks the store (``ScanStore.is_done``) before any graph is
built, and ``run_stage`` asks the same again once it holds the (scan, stage) lease.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from schemas.base import StageConfig
from schemas.manifest import ProvenanceRecord
from schemas.stages import PIPELINE, StageName, StageSpec, StageState, chain_for
from tasks.errors import FedscanError, InvalidInputError, StageIncompleteError
from tasks.labels import LABELS_STAGE
from tasks.storage import ScanStore, StageResult

__all__ = [
    "STAGES",
    "Stage",
    "StageRun",
    "disabled_stages",
    "pending_stages",
    "run_scan_stage",
    "source_of",
    "stage_inputs",
]

ProgressFn = Callable[[float], None]


#: ``driver(scan, config, *, source, inputs, device, force, progress) -> StageResult``: build the stage's graph
#: over the ``source`` array and write it with :meth:`~tasks.storage.ScanStore.run_stage` (passing ``force``),
#: recording ``inputs`` (the upstream record's lineage) and the ``device`` it ran on. ``config`` is the stage's
#: own config type. ``run_stage`` asks the store's same question again under the (scan, stage) lease, so a
#: second run that waited for the first finds the work done instead of redoing it.
Driver = Callable[..., StageResult]


#: ``resolve(scan, config) -> config | None``: a stage whose config depends on something outside the scan (the
#: diagnose stage: the promoted model) pins it into the config before the done-check; None: nothing to run with
#: (recorded not-applicable).
Resolver = Callable[[ScanStore, Any], StageConfig | None]


@dataclass(frozen=True)
class Stage:
    """A stage spec with the code that runs it."""

    spec: StageSpec
    driver: Driver
    resolve: Resolver | None = None

    @property
    def name(self) -> StageName:
        return self.spec.name


@dataclass(frozen=True)
class StageRun:
    """What :func:`run_scan_stage` did with one stage of one scan."""

    stage: StageName
    state: StageState
    result: StageResult | None = None  # None when not applicable

    @property
    def record(self) -> ProvenanceRecord | None:
        return None if self.result is None else self.result.record


def _registry() -> dict[StageName, Stage]:
    from tasks import drivers
    from tasks.diagnose.driver import diagnose_scan, resolve_config
    from tasks.enhance.driver import enhance_scan

    bound: dict[StageName, Driver] = {
        StageName.DENOISE: drivers.denoise_scan,
        StageName.RECONSTRUCT: drivers.reconstruct_scan,
        StageName.ENHANCE: enhance_scan,
        StageName.SURROGATE: drivers.surrogate_scan,
        StageName.DIAGNOSE: diagnose_scan,
    }
    resolvers: dict[StageName, Resolver] = {StageName.DIAGNOSE: resolve_config}
    missing = [spec.name.value for spec in PIPELINE if spec.name not in bound]
    if missing:  # a spec without a driver is a programming error, caught by the first import in any test
        raise RuntimeError(f"stages without a driver: {missing}")
    return {spec.name: Stage(spec, bound[spec.name], resolvers.get(spec.name)) for spec in PIPELINE}


#: Every pipeline stage with its driver, in pipeline order.
STAGES: dict[StageName, Stage] = _registry()


def source_of(scan: ScanStore, spec: StageSpec, *, ignore: Collection[str] = ()) -> tuple[str, ProvenanceRecord]:
    """The array the stage reads (the first of ``spec.reads`` that a completed stage wrote, leaving out what the
    stages named in ``ignore`` wrote: the disabled ones) and that stage's record (its lineage is the stage's
    input: a changed config anywhere upstream makes the stage pending)."""
    records = scan.provenance()
    names = set(scan.array_names())
    for array in spec.reads:
        for rec in records.values():
            if array in rec.outputs and array in names and rec.stage not in ignore:
                return array, rec
    raise StageIncompleteError(
        f"scan {scan.scan_id!r} of site {scan.site.site_id!r}: stage {spec.name.value!r} reads one of "
        f"{list(spec.reads)}, and no completed stage wrote any of them"
    )


def stage_inputs(scan: ScanStore, config: StageConfig, upstream: ProvenanceRecord) -> dict[str, str]:
    """What a stage records as its inputs: the upstream record's lineage, and the ``labels`` record's when the
    config makes the output depend on the labels (:attr:`~schemas.base.StageConfig.reads_labels`)."""
    inputs = {upstream.stage: upstream.lineage()}
    if config.reads_labels:
        labels = scan.stage_record(LABELS_STAGE)
        if labels is not None:
            inputs[LABELS_STAGE] = labels.lineage()
    return inputs


def run_scan_stage(
    scan: ScanStore,
    stage: StageName | str,
    config: StageConfig,
    *,
    device: torch.device,
    force: bool = False,
    progress: ProgressFn | None = None,
    disabled: Collection[str] = (),
) -> StageRun:
    """Run one stage of one scan: not applicable to its data kind, skipped when done with this config and these
    inputs (asked of the store once, before any graph is built), else computed (resuming written chunks).
    ``disabled``: the stages this run's config turns off; their earlier outputs are not read."""
    entry = STAGES[StageName(stage)]
    spec = entry.spec
    if not isinstance(config, spec.config_type):
        raise InvalidInputError(
            f"stage {spec.name.value!r} takes a {spec.config_type.__name__}, got {type(config).__name__}"
        )
    if not spec.applies_to(scan.manifest.data_kind):
        return StageRun(spec.name, StageState.NOT_APPLICABLE)
    if not config.enabled:
        return StageRun(spec.name, StageState.DISABLED)
    if entry.resolve is not None:
        resolved = entry.resolve(scan, config)
        if resolved is None:
            return StageRun(spec.name, StageState.NOT_APPLICABLE)
        config = resolved
    source, upstream = source_of(scan, spec, ignore=disabled)
    inputs = stage_inputs(scan, config, upstream)
    if not force and scan.is_done(spec.name, config.config_hash(), inputs):
        rec = scan.stage_record(spec.name)
        assert rec is not None
        skipped = StageResult(rec, skipped=True, chunks_written=0, chunks_present=0)
        return StageRun(spec.name, StageState.SKIPPED, skipped)
    result = entry.driver(scan, config, source=source, inputs=inputs, device=device, force=force, progress=progress)
    return StageRun(spec.name, StageState.DONE, result)


def disabled_stages(configs: Mapping[StageName, StageConfig]) -> frozenset[str]:
    """The stages these configs turn off."""
    return frozenset(name.value for name, config in configs.items() if not config.enabled)


def pending_stages(scan: ScanStore, configs: Mapping[StageName, StageConfig]) -> list[StageName]:
    """The stages of the scan's chain that are not done with these configs (a cheap read of its records: no
    graph, no array). A stage whose upstream is itself pending counts as pending."""
    pending: list[StageName] = []
    disabled = disabled_stages(configs)
    for spec in chain_for(scan.manifest.data_kind):
        if spec.name in disabled:
            continue
        config = configs[spec.name]
        resolve = STAGES[spec.name].resolve
        if resolve is not None:
            try:
                resolved = resolve(scan, config)
            except FedscanError:  # e.g. a damaged registry: pending, so that the stage runs and fails naming it
                pending.append(spec.name)
                continue
            if resolved is None:  # nothing to run with (no promoted model): not pending
                continue
            config = resolved
        if pending:
            pending.append(spec.name)
            continue
        try:
            source, upstream = source_of(scan, spec, ignore=disabled)
        except StageIncompleteError:
            pending.append(spec.name)
            continue
        del source
        if not scan.is_done(spec.name, config.config_hash(), stage_inputs(scan, config, upstream)):
            pending.append(spec.name)
    return pending
