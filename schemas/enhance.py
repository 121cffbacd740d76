"""Configuration of the enhance stage: the learned post-reconstruction network applied slice by slice."""

from __future__ import annotations

from pydantic import Field

from schemas.base import StageConfig


class EnhanceConfig(StageConfig):
    """The enhance stage: which trained network (a checkpoint file) maps each reconstructed HU slice to a
    cleaner one. Off unless a model is given, so the default pipeline is denoise → reconstruct → surrogate."""

    model_path: str | None = Field(
        default=None,
        min_length=1,
        description="Checkpoint of the trained network (tasks.enhance.model format), a local path; None turns "
        "the stage off (reported 'disabled'; surrogate then reads the reconstruction).",
    )
    model_sha256: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{64}$",
        description="Pins the model version: a checkpoint with another sha256 is refused. The config hash (which "
        "decides whether the stage is done) covers the path, not the file: pin the version so that a new model "
        "at the same path recomputes.",
    )
    batch_slices: int = Field(default=8, gt=0, le=4096, description="Slices per forward pass (memory only).")
    slice_block: int = Field(
        default=16, gt=0, le=4096, description="Slices per Dask task and per written chunk (resume granularity)."
    )

    @property
    def enabled(self) -> bool:
        """On only when a model is given."""
        return self.model_path is not None
