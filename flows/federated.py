"""Flow: federated training across the sites' surrogates, or their projections for the enhance network (Flower
simulation by default, a SuperLink otherwise)."""

from __future__ import annotations

from typing import cast

from prefect import flow
from pydantic import Field

from schemas.base import FrozenModel
from schemas.federation import FederatedTask, FederationConfig, FederationReport
from schemas.settings import get_settings
from tasks.prefect_tasks import federated_stage


class FederatedRequest(FrozenModel):
    """Which sites train together, and how (rounds, strategy, privacy: see FederationConfig)."""

    data_root: str | None = Field(default=None, description="Folder of <site>.zarr stores; default from settings.")
    sites: tuple[str, ...] | None = Field(default=None, description="Only these sites (default: all).")
    config: FederationConfig = Field(default_factory=FederationConfig)


@flow(name="federated-training", flow_run_name="federated-{request.config.strategy}")
def federated_training(request: FederatedRequest) -> FederationReport:
    """Train one model across the sites; only model updates leave a site. Models land in <data_root>/models
    (task enhance: also <data_root>/models/enhance-current.pt; sites without projection scans are skipped)."""
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
    report = federated_stage(stores, request.config, models)
    return cast(FederationReport, report)
