"""Flow: federated training across the sites' surrogates, or their projections for the enhance network (Flower
simulation by default, a SuperLink otherwise)."""

from __future__ import annotations

from typing import cast

from prefect import flow, get_run_logger, task
from pydantic import Field

from schemas.base import FrozenModel
from schemas.federation import FederatedTask, FederationConfig, FederationReport
from schemas.registry import Decision
from schemas.settings import get_settings
from tasks.continual import TrainingPlan
from tasks.prefect_tasks import federated_stage


@task(name="plan-federated-run")
def plan_federated_run(data_root: str, stores: list[str], config: FederationConfig) -> TrainingPlan:
    """Train only when labelled scans arrived since the last model; warm-start from the promoted one."""
    from tasks.continual import plan_training

    plan = plan_training(data_root, stores, config)
    logger = get_run_logger()
    logger.info("federated run: %s", plan.reason)
    for note in plan.notes:
        logger.warning("%s", note)
    return plan


@task(name="register-model")
def register_federated_model(
    data_root: str, report: FederationReport, config: FederationConfig, plan: TrainingPlan
) -> Decision:
    """Register the run's model with its card; the gate promotes it, keeps it, or marks it failed."""
    from tasks.continual import register_run

    card, decision = register_run(data_root, report, config, plan)
    get_run_logger().info("model %s: %s: %s", card.version, decision.outcome.value, decision.reason)
    return decision


def skipped_report(config: FederationConfig, reason: str) -> FederationReport:
    """The report of a run that was not needed."""
    mode = "deployment" if get_settings().flower.superlink_address else "simulation"
    return FederationReport(
        run_id="",
        mode=mode,
        status="skipped",
        config_hash=config.config_hash(),
        rounds=(),
        final_model_dir=None,
        wall_seconds=0.0,
        model={"outcome": "skipped", "reason": reason},
    )


class FederatedRequest(FrozenModel):
    """Which sites train together, and how (rounds, strategy, privacy: see FederationConfig)."""

    data_root: str | None = Field(default=None, description="Folder of <site>.zarr stores; default from settings.")
    sites: tuple[str, ...] | None = Field(default=None, description="Only these sites (default: all).")
    config: FederationConfig = Field(default_factory=FederationConfig)


@flow(name="federated-training", flow_run_name="federated-{request.config.strategy}")
def federated_training(request: FederatedRequest) -> FederationReport:
    """Train one model across the sites when labelled scans arrived since the last one (warm-started from the
    promoted model); only model updates leave a site. The model is registered in <data_root>/models/registry
    with its card and promoted when the gate passes it. Task enhance trains on the sites' projections (sites
    without projection scans are skipped) and lands in <data_root>/models/enhance-current.pt."""
    from tasks.pipeline_support import federated_sites

    root = request.data_root or get_settings().data_root
    models = f"{root.rstrip('/')}/models"
    if request.config.task is FederatedTask.ENHANCE:  # trains on projections, not surrogates
        from tasks.federated.enhance_task import enhance_sites
        from tasks.pipeline_support import site_uris

        stores, skipped, config = enhance_sites(site_uris(root, request.sites), request.config)
        trained = cast(FederationReport, federated_stage(stores, config, models))
        return trained.model_copy(update={"skipped_sites": skipped})
    stores = federated_sites(root, request.sites)
    plan = plan_federated_run(root, stores, request.config)
    if not plan.train:  # nothing new to learn from: the promoted model stands
        return skipped_report(request.config, plan.reason)
    report = federated_stage(stores, request.config, models, initial_model=plan.initial_model)
    decision = register_federated_model(root, cast(FederationReport, report), request.config, plan)
    return cast(FederationReport, report).model_copy(update={"model": decision.model_dump(mode="json")})
