"""Configuration of the reconstruction stage."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from schemas.base import StageConfig

ReconstructMethod = Literal["fbp", "sart", "sirt"]
FilterName = Literal["ram-lak", "shepp-logan", "cosine", "hann"]
OutputUnit = Literal["hu", "attenuation"]


class ReconstructConfig(StageConfig):
    """How slices are reconstructed from (denoised) line-integral projections.

    The stage driver takes the water value from the scan's manifest; ``water_attenuation_per_mm`` here serves
    direct calls of the chunked functions.
    """

    method: ReconstructMethod = Field(
        default="fbp", description="fbp (filtered back-projection), sart or sirt (iterative)."
    )
    filter_name: FilterName = Field(
        default="hann",
        description="FBP window on the ramp filter; hann suppresses noise best (the honest baseline).",
    )
    frequency_cutoff: float = Field(
        default=1.0,
        gt=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="FBP filter cutoff as a fraction of the Nyquist frequency (dimensionless, (0, 1]).",
    )
    iterations: int = Field(
        default=20, ge=1, le=10_000, description="SART/SIRT sweeps over all views (count; unused by fbp)."
    )
    relaxation: float = Field(
        default=1.0,
        gt=0.0,
        lt=2.0,
        allow_inf_nan=False,
        description="SART/SIRT relaxation factor (dimensionless, (0, 2); unused by fbp).",
    )
    nonnegative: bool = Field(default=True, description="SART/SIRT: clip negative attenuation to 0 after each update.")
    slice_block: int = Field(
        default=16,
        ge=1,
        le=4096,
        description="Slices (detector rows) per task; memory per task ~ views x cols x slice_block x 4 B "
        "in, ny x nx x slice_block x 4 B out.",
    )
    output_unit: OutputUnit = Field(
        default="hu", description="hu (Hounsfield units, via water_attenuation_per_mm) or attenuation (1/mm)."
    )
    water_attenuation_per_mm: float = Field(
        default=0.0192,
        gt=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="Linear attenuation of water at the effective energy, 1/mm (HU = 0).",
    )
