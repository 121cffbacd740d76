"""Configuration of the diagnose stage: the promoted global model applied to a scan's surrogate slices."""

from __future__ import annotations

from pydantic import Field

from schemas.base import StageConfig
from schemas.federation import FederatedTask


class DiagnoseConfig(StageConfig):
    """Which model scores the surrogates (the registry's promoted one unless pinned) and what counts as flagged.

    ``model_sha256`` is filled in per run from the registry (the config hash, which decides whether the stage is
    done, then names the model: a newly promoted model re-diagnoses every scan once)."""

    model_version: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{6,16}$",
        description="Use this registered model (a version or unique prefix) instead of the promoted one.",
    )
    model_sha256: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{64}$",
        description="The model actually used (set from the registry; a model with another sha256 is refused).",
    )
    registry_uri: str | None = Field(
        default=None,
        min_length=1,
        description="The model registry (folder or fsspec URL); None: <data root>/models/registry, the data root "
        "being the folder that holds the site's store.",
    )
    task: FederatedTask | None = Field(
        default=None, description="The task this site expects; a model of another task is refused (None: any)."
    )
    threshold: float = Field(default=0.5, gt=0, lt=1, description="A slice is flagged when its probability ≥ this.")
    batch_slices: int = Field(default=16, gt=0, le=4096, description="Slices per forward pass (memory only).")
    slice_block: int = Field(
        default=32, gt=0, le=4096, description="Slices per Dask task and per written chunk (resume granularity)."
    )
