"""The model registry's documents: a model card per trained model, and the decision taken on it.

A card is shareable (metrics, settings, pseudonymous scan ids and label digests; never an image or an identifier);
it is written once, beside the weights it describes, and never changed. Which model is in use is a separate
pointer (``current.json``) that promotion and rollback replace atomically.
"""

from __future__ import annotations

import math
from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import Field

from schemas.base import FrozenModel
from schemas.federation import FederatedTask

__all__ = ["CurrentPointer", "Decision", "ModelCard", "Outcome", "PrivacyCard", "SiteCard"]

_SHA256 = r"^[0-9a-f]{64}$"
_VERSION = r"^[0-9a-f]{16}$"


class SiteCard(FrozenModel):
    """One site's part in a model: how much labelled data it trained on and its validation metrics, computed at
    the site on its own held-out scans and sent to the server as metrics only."""

    site_id: str = Field(min_length=1, max_length=64)
    labelled_scans: int = Field(ge=0, description="Labelled scans with completed surrogates at training time.")
    validation: dict[str, float] = Field(
        default_factory=dict, description="The site's held-out metrics of the final global model (auc, loss, ...)."
    )


class PrivacyCard(FrozenModel):
    """The run's secure aggregation and differential privacy settings, with the accounted ε."""

    secagg: bool
    dp_mode: str = Field(description="off | server | client.")
    dp_noise_multiplier: float | None = Field(default=None, ge=0)
    dp_clipping_norm: float | None = Field(default=None, gt=0)
    dp_delta: float | None = Field(default=None, gt=0, lt=1)
    epsilon: float | None = Field(default=None, ge=0, description="ε at dp_delta over the run's rounds; None: no DP.")


class ModelCard(FrozenModel):
    """Everything known about one trained global model."""

    format_version: Literal[1] = 1
    sha256: str = Field(pattern=_SHA256, description="sha256 of the weights file (canonical serialisation).")
    task: FederatedTask
    input_size: tuple[int, int] = Field(description="(H, W) of the surrogate slices it was trained on, pixels.")
    architecture: str = Field(description="Model class, e.g. LesionClassifier.")
    base_channels: int = Field(ge=1)
    fedbn: bool
    local_bn_statistics: bool
    sites: tuple[SiteCard, ...]
    rounds: int = Field(ge=0, description="Train rounds run.")
    strategy: str
    privacy: PrivacyCard
    metric: str = Field(default="auc", description="The promotion metric (larger is better).")
    metric_value: float | None = Field(description="The metric aggregated over the sites (slice-weighted mean).")
    train_loss: float | None = Field(default=None, description="Mean client training loss of the last round.")
    parent: str | None = Field(default=None, pattern=_VERSION, description="Version it was warm-started from.")
    warm_start: bool = False
    local_finetune_epochs: int = Field(default=0, ge=0, description="Local fine-tuning epochs at each site.")
    training_data: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="site → scan id → digest of the scan's labels it was trained on."
    )
    federation_config_hash: str = ""
    run_id: str = ""
    code_version: str = Field(description="fedscan version plus git commit where known.")
    created_at: datetime

    @property
    def version(self) -> str:
        """The model's short name: the first 16 hex digits of its sha256."""
        return self.sha256[:16]

    @property
    def diverged(self) -> bool:
        """A NaN / missing metric or a non-finite training loss: never promoted."""
        bad_metric = self.metric_value is None or not math.isfinite(self.metric_value)
        bad_loss = self.train_loss is not None and not math.isfinite(self.train_loss)
        return bad_metric or bad_loss


class Outcome(StrEnum):
    """What the promotion gate did with a registered model."""

    PROMOTED = "promoted"
    KEPT = "kept"  # registered, not promoted: worse than the current model by more than the margin
    FAILED = "failed"  # diverged (NaN loss or metric): never promoted


class Decision(FrozenModel):
    """One decision of the promotion gate (or a manual promote / rollback)."""

    version: str = Field(pattern=_VERSION)
    outcome: Outcome
    reason: str = Field(max_length=500)
    metric: str = "auc"
    value: float | None = None
    current_version: str | None = Field(default=None, description="The model that was current before.")
    current_value: float | None = None
    margin: float = Field(default=0.0, ge=0)
    decided_at: datetime


class CurrentPointer(FrozenModel):
    """``current.json``: the promoted model and the ones promoted before it (newest last)."""

    version: str = Field(pattern=_VERSION)
    sha256: str = Field(pattern=_SHA256)
    history: tuple[str, ...] = Field(default=(), description="Previously current versions, oldest first.")
    updated_at: datetime
