"""The stage contract: every stage's name, config type, the arrays it reads and writes and the data kinds it
accepts, in pipeline order.

This module holds the data half of the contract (``schemas/`` imports nothing of ours); ``tasks/stages.py``
binds each spec to its driver. Everything that walks the pipeline — the flows, the Prefect tasks, the run
report, ``fedscan inspect`` and the federated data reader — reads :data:`PIPELINE`. Adding a stage is one spec
here (plus its config section in :class:`~schemas.pipeline.PipelineConfig`) and one driver line in
``tasks/stages.py``.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import ConfigDict, Field

from schemas.base import FrozenModel, StageConfig
from schemas.denoise import DenoiseConfig
from schemas.diagnose import DiagnoseConfig
from schemas.enhance import EnhanceConfig
from schemas.manifest import DataKind
from schemas.reconstruct import ReconstructConfig
from schemas.surrogate import SurrogateConfig

__all__ = ["PIPELINE", "PROJECTION_KINDS", "StageName", "StageSpec", "StageState", "chain_for", "spec_of"]


class StageName(StrEnum):
    """Every stage a scan can go through (ingest writes the scan; the others are :data:`PIPELINE`)."""

    INGEST = "ingest"
    DENOISE = "denoise"
    RECONSTRUCT = "reconstruct"
    ENHANCE = "enhance"
    SURROGATE = "surrogate"
    DIAGNOSE = "diagnose"


class StageState(StrEnum):
    """What a run did with one stage of one scan."""

    DONE = "done"  # computed (or resumed) and recorded
    SKIPPED = "skipped"  # already done with the same config and inputs
    NOT_APPLICABLE = "not-applicable"  # nothing for this scan: its data kind, or no promoted model (never a failure)
    DISABLED = "disabled"  # the stage's config turns it off (an optional stage)
    FAILED = "failed"
    NOT_RUN = "not-run"  # an earlier stage of the same scan failed


#: Data kinds whose scans hold projections (denoise and reconstruct apply).
PROJECTION_KINDS: frozenset[DataKind] = frozenset({DataKind.COUNTS, DataKind.LINE_INTEGRALS})


class StageSpec(FrozenModel):
    """One stage of the pipeline, as data."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    name: StageName
    config_type: type[StageConfig] = Field(description="The config section's type; its hash keys skipping.")
    reads: tuple[str, ...] = Field(description="Arrays read, in order of preference (the first present is used).")
    writes: tuple[str, ...] = Field(description="Arrays written; the stage is done when its record names them.")
    data_kinds: frozenset[DataKind] = Field(description="Scan data kinds the stage applies to.")
    summary: str = Field(description="One line for the UI and the CLI help.")

    def applies_to(self, kind: DataKind) -> bool:
        return kind in self.data_kinds


#: The pipeline, in order. A scan's chain is this tuple filtered by its data kind (:func:`chain_for`).
PIPELINE: tuple[StageSpec, ...] = (
    StageSpec(
        name=StageName.DENOISE,
        config_type=DenoiseConfig,
        reads=("projections",),
        writes=("projections_denoised",),
        data_kinds=PROJECTION_KINDS,
        summary="Low-rank view-group denoising of the scan's projections.",
    ),
    StageSpec(
        name=StageName.RECONSTRUCT,
        config_type=ReconstructConfig,
        reads=("projections_denoised", "projections"),
        writes=("volume",),
        data_kinds=PROJECTION_KINDS,
        summary="FBP / SART / SIRT of the (denoised) projections into the scan's volume.",
    ),
    StageSpec(
        name=StageName.ENHANCE,
        config_type=EnhanceConfig,
        reads=("volume",),
        writes=("enhanced",),
        # Every kind: an image-only site's volume is a reconstruction too (the scanner's), and a network trained
        # on the projection sites is what such a site has no other way to get.
        data_kinds=frozenset(DataKind),
        summary="The federally trained post-reconstruction network, slice by slice (off unless a model is set).",
    ),
    StageSpec(
        name=StageName.SURROGATE,
        config_type=SurrogateConfig,
        reads=("enhanced", "volume"),
        writes=("surrogate",),
        data_kinds=frozenset(DataKind),
        summary="FESF surrogates of the scan's volume: the only images federated training sees.",
    ),
    StageSpec(
        name=StageName.DIAGNOSE,
        config_type=DiagnoseConfig,
        reads=("surrogate",),
        writes=("predictions",),
        data_kinds=frozenset(DataKind),
        summary="Per-slice lesion probabilities from the promoted model with the site's own BatchNorm statistics.",
    ),
)


def spec_of(name: StageName | str) -> StageSpec:
    """The spec of a pipeline stage, by name (a clear error for an unknown one)."""
    for spec in PIPELINE:
        if spec.name == name:
            return spec
    raise ValueError(f"unknown stage {name!r}; the pipeline's stages are {[s.name.value for s in PIPELINE]}")


def chain_for(kind: DataKind) -> tuple[StageSpec, ...]:
    """The stages a scan of this data kind runs, in pipeline order."""
    return tuple(spec for spec in PIPELINE if spec.applies_to(kind))
