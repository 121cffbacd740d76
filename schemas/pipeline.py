"""The whole pipeline's configuration: one YAML file (``configs/*.yaml``) or a flow parameter."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import Field

from schemas.base import FrozenModel
from schemas.denoise import DenoiseConfig
from schemas.federation import FederationConfig
from schemas.reconstruct import ReconstructConfig
from schemas.surrogate import SurrogateConfig


def _reconstruct_default() -> ReconstructConfig:
    # Volumes are stored in HU (ARCHITECTURE.md); the surrogate stage reads HU.
    return ReconstructConfig(output_unit="hu")


class PipelineConfig(FrozenModel):
    """Every stage's settings; each section has its own defaults and units."""

    denoise: DenoiseConfig = Field(default_factory=DenoiseConfig)
    reconstruct: ReconstructConfig = Field(default_factory=_reconstruct_default)
    surrogate: SurrogateConfig = Field(default_factory=SurrogateConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)

    @classmethod
    def from_yaml(cls, path: str | Path) -> PipelineConfig:
        """Parse a YAML file; unknown keys and out-of-range values are refused with their location."""
        raw = yaml.safe_load(Path(path).read_text()) or {}
        return cls.model_validate(raw)
