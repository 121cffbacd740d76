"""Continuous learning around a federated run: whether to train at all (only when labelled scans arrived since the
last model), where to start from (the promoted model: warm start), and what becomes of the result (registered
with its card, then promoted or not by the registry's gate).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt

from schemas.federation import DpMode, FederationConfig, FederationReport
from schemas.registry import Decision, ModelCard, PrivacyCard, SiteCard
from tasks.errors import InvalidInputError
from tasks.registry import (
    WEIGHTS,
    ModelRegistry,
    new_training_data,
    serialize_arrays,
    training_inventory,
    weights_sha256,
)

__all__ = ["TrainingPlan", "has_training_data", "plan_training", "register_run"]

LOG = logging.getLogger("fedscan.continual")
#: δ of the (ε, δ) reported on model cards of DP runs.
DP_DELTA = 1e-5
_ARCHITECTURE = {"classify": "LesionClassifier", "segment": "LesionUNet"}


@dataclass(frozen=True)
class TrainingPlan:
    """What a federated run should do, decided before Flower starts."""

    train: bool
    reason: str
    inventory: dict[str, dict[str, str]]
    input_size: tuple[int, int]
    new: tuple[str, ...] = ()
    parent: ModelCard | None = None  # the warm start's model
    initial_model: str = ""  # its weights file
    notes: tuple[str, ...] = field(default_factory=tuple)


def _input_size(site_stores: Sequence[str], inventory: dict[str, dict[str, str]]) -> tuple[int, int]:
    from tasks.federated.data import SURROGATE_ARRAY
    from tasks.storage import SiteStore

    sizes = set()
    for uri in site_stores:
        site = SiteStore.open(uri, mode="r")
        for scan_id in inventory.get(site.site_id, {}):
            shape = site.scan(scan_id).array(SURROGATE_ARRAY).shape
            sizes.add((int(shape[-2]), int(shape[-1])))
    if len(sizes) != 1:
        raise InvalidInputError(f"the sites' labelled surrogates must share one slice size, found {sorted(sizes)}")
    return sizes.pop()


def _fits(card: ModelCard, config: FederationConfig, size: tuple[int, int]) -> str:
    """Why ``card``'s weights cannot start this run (empty when they can)."""
    if card.task is not config.task:
        return f"it is a {card.task.value} model"
    if card.input_size != size:
        return f"it was trained on {card.input_size[0]}x{card.input_size[1]} surrogates"
    if (card.base_channels, card.fedbn, card.local_bn_statistics) != (
        config.base_channels,
        config.fedbn,
        config.local_bn_statistics,
    ):
        return "its architecture or BatchNorm policy differs"
    return ""


def has_training_data(data_root: str, sites: Sequence[str] | None = None) -> bool:
    """Whether any site under ``data_root`` has labelled surrogates (a federated run could learn something)."""
    from tasks.errors import FedscanError
    from tasks.pipeline_support import federated_sites

    try:
        return bool(federated_sites(data_root, sites))
    except (FedscanError, FileNotFoundError):
        return False


def plan_training(data_root: str, site_stores: Sequence[str], config: FederationConfig) -> TrainingPlan:
    """Train only when the sites hold labelled scans (or changed labels) that the newest model of this task was
    not trained on, or the run's configuration changed; warm-start from the promoted model when it fits."""
    registry = ModelRegistry.for_data_root(data_root)
    inventory = training_inventory(site_stores, task=config.task)
    size = _input_size(site_stores, inventory)
    latest = None
    for version in reversed(registry.versions()):
        card = registry.card(version)
        if card.task is config.task and card.input_size == size:
            latest = card
            break
    new = tuple(new_training_data(latest, inventory))
    if latest is not None and not new and latest.federation_config_hash == config.config_hash():
        reason = f"no labelled scans arrived since model {latest.version} was trained; nothing to train"
        return TrainingPlan(False, reason, inventory, size, parent=latest)
    if latest is None:
        why = "no earlier model of this task"
    elif new:
        why = f"{len(new)} new or relabelled scans since model {latest.version}"
    else:
        why = f"the federation config changed since model {latest.version}"
    current = registry.current() if config.warm_start else None
    notes: list[str] = []
    if current is not None:
        unfit = _fits(current, config, size)
        if unfit:
            notes.append(f"cold start: the promoted model {current.version} cannot start this run ({unfit})")
            current = None
        else:
            registry.load(current.version)  # its files are checked before the server reads them
    initial = f"{registry.uri}/{current.version}/{WEIGHTS}" if current is not None else ""
    start = f"warm start from {current.version}" if current is not None else "fresh model"
    return TrainingPlan(True, f"{why}; {start}", inventory, size, new, current, initial, tuple(notes))


def _final_arrays(report: FederationReport) -> dict[str, npt.NDArray[np.float32]]:
    import torch

    if report.final_model_dir is None:
        raise InvalidInputError(f"federated run {report.run_id} saved no model")
    state = torch.load(Path(report.final_model_dir) / "model.pt", map_location="cpu", weights_only=True)
    return {k: v.numpy().astype(np.float32) for k, v in state.items()}


def build_card(
    report: FederationReport, config: FederationConfig, plan: TrainingPlan, arrays: dict[str, npt.NDArray[np.float32]]
) -> ModelCard:
    """The card of the run's final global model (per-site metrics as the sites reported them)."""
    from tasks.federated.privacy import gaussian_dp_epsilon
    from tasks.storage import code_version

    train = [r for r in report.train_rounds if r.aggregated]
    last = train[-1] if train else None
    evaluated = [r for r in report.train_rounds if r.site_metrics]
    site_metrics = evaluated[-1].site_metrics if evaluated else {}
    finite = all(bool(np.isfinite(a).all()) for a in arrays.values())
    value = report.train_rounds[-1].eval_auc if report.train_rounds else None
    if not finite:
        value = math.nan
    dp = config.dp_mode is not DpMode.OFF
    privacy = PrivacyCard(
        secagg=config.secagg,
        dp_mode=config.dp_mode.value,
        dp_noise_multiplier=config.dp_noise_multiplier if dp else None,
        dp_clipping_norm=config.dp_clipping_norm if dp else None,
        dp_delta=DP_DELTA if dp else None,
        epsilon=(
            gaussian_dp_epsilon(
                config.dp_noise_multiplier,
                rounds=config.num_rounds,
                delta=DP_DELTA,
                sampling_rate=config.fraction_train,
            )
            if dp and config.dp_noise_multiplier > 0
            else None
        ),
    )
    sites = tuple(
        SiteCard(
            site_id=site,
            labelled_scans=len(scans),
            validation={k: v for k, v in site_metrics.get(site, {}).items() if k != "num-examples"},
        )
        for site, scans in sorted(plan.inventory.items())
    )
    return ModelCard(
        sha256=weights_sha256(arrays),
        task=config.task,
        input_size=plan.input_size,
        architecture=_ARCHITECTURE[config.task.value],
        base_channels=config.base_channels,
        fedbn=config.fedbn,
        local_bn_statistics=config.local_bn_statistics,
        sites=sites,
        rounds=len(report.train_rounds),
        strategy=config.strategy.value,
        privacy=privacy,
        metric="auc",
        metric_value=value,
        train_loss=None if last is None else last.train_loss,
        parent=None if plan.parent is None or not plan.initial_model else plan.parent.version,
        warm_start=bool(plan.initial_model),
        local_finetune_epochs=config.personalisation_epochs,
        training_data=plan.inventory,
        federation_config_hash=config.config_hash(),
        run_id=report.run_id,
        code_version=code_version(),
        created_at=datetime.now(UTC),
    )


def register_run(
    data_root: str, report: FederationReport, config: FederationConfig, plan: TrainingPlan
) -> tuple[ModelCard, Decision]:
    """Register the run's final model with its card and put it through the promotion gate (margin from the
    config); the decision is published (Prefect event and artifact) and, when configured, logged to MLflow."""
    from schemas.settings import get_settings
    from tasks.registry import log_to_mlflow, publish_decision

    arrays = _final_arrays(report)
    registry = ModelRegistry.for_data_root(data_root)
    card = registry.register(build_card(report, config, plan, arrays), arrays)
    decision = registry.gate(card, margin=config.promotion_margin)
    LOG.info("model %s: %s (%s)", card.version, decision.outcome.value, decision.reason)
    publish_decision(decision, card)
    tracking = get_settings().mlflow.tracking_uri
    if tracking:
        log_to_mlflow(card, serialize_arrays(arrays), tracking_uri=tracking)
    return card, decision
