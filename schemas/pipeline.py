"""The whole pipeline's configuration: one YAML file (``configs/pipeline.yaml``) or a flow parameter."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from schemas.base import FrozenModel, StageConfig, YamlFileError, load_yaml_model
from schemas.denoise import DenoiseConfig
from schemas.diagnose import DiagnoseConfig
from schemas.enhance import EnhanceConfig
from schemas.federation import FederationConfig
from schemas.reconstruct import ReconstructConfig
from schemas.settings import Device
from schemas.stages import StageName
from schemas.surrogate import SurrogateConfig


class ConfigFileError(YamlFileError):
    """A pipeline config file that cannot be read or validated; the message names the file and the key."""


def _reconstruct_default() -> ReconstructConfig:
    # Volumes are stored in HU (ARCHITECTURE.md); the surrogate stage reads HU.
    return ReconstructConfig(output_unit="hu")


class PipelineConfig(FrozenModel):
    """Every stage's settings (one section per stage of :data:`schemas.stages.PIPELINE`, named after it) and the
    federated run's; each section has its own defaults and units."""

    device: Device | None = Field(
        default=None,
        description="Where the stages' torch kernels run (auto | cpu | cuda); None: FEDSCAN_DEVICE. A run "
        "setting: recorded in each stage's provenance, never part of a stage's config hash, so work written on "
        "a CPU counts as done on a GPU worker and back.",
    )
    denoise: DenoiseConfig = Field(default_factory=DenoiseConfig)
    reconstruct: ReconstructConfig = Field(default_factory=_reconstruct_default)
    enhance: EnhanceConfig = Field(default_factory=EnhanceConfig)
    surrogate: SurrogateConfig = Field(default_factory=SurrogateConfig)
    diagnose: DiagnoseConfig = Field(default_factory=DiagnoseConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)

    def stage_config(self, stage: StageName | str) -> StageConfig:
        """The config section of a pipeline stage."""
        section = getattr(self, StageName(stage).value, None)
        if not isinstance(section, StageConfig):
            raise TypeError(f"stage {stage!r} has no config section")
        return section

    @classmethod
    def from_yaml(cls, path: str | Path) -> PipelineConfig:
        """Parse a YAML file; an unknown key or an out-of-range value is refused naming the file and the key."""
        return load_yaml_model(cls, path, what="pipeline config", error=ConfigFileError)
