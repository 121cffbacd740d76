"""Configuration of the FESF surrogate stage (arXiv:2403.16473; docs/methods.md §3).

The Image Hidden Module (IHM) replaces every private slice by a *surrogate*: the inverse FFT of the host
image's phase with an amplitude that, inside a centred square of low frequencies of half-width
``⌊alpha · min(H, W)⌋`` (the FDA convention), is ``(1 - beta) · A_host + beta · A_private`` and the host's
amplitude outside it. Hosts come from a public pool that ships with the code (analytic phantoms and
scikit-image's sample images), chosen per slice by ``host_policy``. The optional Image Quality Enhancement
Module (IQEM) trains a small unpaired generator per site that pulls surrogates towards the host domain, then
re-embeds the private amplitude into the generator's output with a second IHM pass.

Private slices (HU or 1/mm) and hosts are first mapped to a common dimensionless range: a slice in HU goes
through ``(HU - window_low) / (window_high - window_low)`` (default: air -1000 HU → 0, +1000 HU → 1, water
0.5; not clipped); a slice in 1/mm is first converted to HU with ``water_attenuation_per_mm``. Hosts are
scaled to [0, 1] by their own minimum and maximum. Surrogates are written in that dimensionless range.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Self

from pydantic import Field, model_validator

from schemas.base import FrozenModel, StageConfig


class HostPolicy(StrEnum):
    """How the public host image of each slice is chosen."""

    FIXED = "fixed"  # one secret host per site (drawn from host_seed and the site id), acting like a key
    PER_CLASS = "per_class"  # one host per (site, slice label); needs the labels, and the host reveals the label
    RANDOM = "random"  # a host per slice, drawn from host_seed, the site id and the slice index


class IntensityUnit(StrEnum):
    """Unit of the private volume handed to the surrogate stage."""

    HU = "hu"  # Hounsfield units (the reconstruct stage's output)
    PER_MM = "per_mm"  # linear attenuation, 1/mm (the demo data's truth volumes)


class SurrogateVariant(StrEnum):
    """The hiding method: the paper's IHM, or a fedscan variant of it (docs/privacy.md, "What an attacker can do")."""

    PAPER = "paper"  # arXiv:2403.16473 as stated: host phase, mixed low-frequency amplitude
    AMPLITUDE_NOISE = "amplitude_noise"  # the private amplitude times exp(sigma * noise) inside the mask
    PRIVATE_PHASE = "private_phase"  # the private phase inside the lowest private_phase_half_width bins


class IqemConfig(FrozenModel):
    """The Image Quality Enhancement Module: a small unpaired GAN trained per site on its own surrogates."""

    enabled: bool = Field(
        default=False,
        description="Train G and apply G, then a second IHM pass. Off by default: measured, it changes nothing it "
        "is meant to change. A discriminator telling surrogates from host-domain images scores the same AUC without "
        "IQEM and with it (0.766 and 0.766; 0.740 and 0.740 with other host draws; benchmarks/privacy.py, 32² "
        "crops, hosts drawn from public CT crops, docs/privacy.md). "
        "benchmarks/surrogate.py found IQEM and plain surrogates equally far from the host (17.34 dB), with "
        "equal utility.",
    )
    steps: int = Field(default=300, ge=1, le=100_000, description="Optimiser steps of G and D each, steps.")
    batch_size: int = Field(default=8, ge=1, le=1024, description="Surrogates (and host crops) per step, images.")
    learning_rate: float = Field(
        default=2e-4, gt=0, le=1.0, allow_inf_nan=False, description="Adam learning rate of G and D."
    )
    channels: int = Field(default=16, ge=4, le=256, description="Feature channels of G and D, channels.")
    content_weight: float = Field(
        default=5.0,
        ge=0,
        le=1e4,
        allow_inf_nan=False,
        description="Weight of the L1 term |G(s) - s| that keeps G close to its input (dimensionless).",
    )
    seed: int = Field(default=0, ge=0, le=2**63 - 1, description="Seed of G's and D's weights and batch order.")


class SurrogateConfig(StageConfig):
    """Parameters of the FESF surrogate stage; defaults as in docs/methods.md §3 (alpha 0.1, beta 0.5, fixed host)."""

    alpha: float = Field(
        default=0.1,
        ge=0.0,
        le=0.5,
        allow_inf_nan=False,
        description="Size of the low-frequency square: half-width ⌊alpha·min(H, W)⌋ frequency bins "
        "(dimensionless; 0 embeds nothing, 0.5 covers every frequency of a square slice).",
    )
    beta: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="Share of the private amplitude inside the square (dimensionless; 0 returns the host).",
    )
    host_policy: HostPolicy = Field(default=HostPolicy.FIXED, description="How each slice's host is chosen.")
    host_seed: int = Field(
        default=0,
        ge=0,
        le=2**63 - 1,
        description="Site secret from which hosts are drawn (with the site id); set a random one per site.",
    )
    host_pool: tuple[str, ...] | None = Field(
        default=None,
        min_length=1,
        description="Names of the public hosts to draw from, in order (see tasks.surrogate.hosts.HOST_NAMES); "
        "None: every built-in host.",
    )
    input_unit: IntensityUnit = Field(default=IntensityUnit.HU, description="Unit of the private volume.")
    window_hu: tuple[float, float] = Field(
        default=(-1000.0, 1000.0),
        description="(low, high) HU mapped to 0 and 1 before hiding (linear, not clipped), HU.",
    )
    water_attenuation_per_mm: float = Field(
        default=0.0192, gt=0, lt=1, allow_inf_nan=False, description="Water, for 1/mm input, 1/mm."
    )
    variant: SurrogateVariant = Field(
        default=SurrogateVariant.PAPER,
        description="Hiding method: 'paper' (the IHM as stated), 'amplitude_noise' (log-normal noise of "
        "amplitude_noise_sigma on the embedded private amplitude, drawn per slice from host_seed) or "
        "'private_phase' (the private phase inside the lowest private_phase_half_width bins).",
    )
    amplitude_noise_sigma: float = Field(
        default=0.0,
        ge=0.0,
        le=10.0,
        allow_inf_nan=False,
        description="Standard deviation of the log-amplitude noise of variant 'amplitude_noise', nepers.",
    )
    private_phase_half_width: int = Field(
        default=0, ge=0, le=256, description="Half-width of variant 'private_phase''s square, frequency bins."
    )
    iqem: IqemConfig = Field(default_factory=IqemConfig, description="Quality enhancement (off by default).")

    @property
    def reads_labels(self) -> bool:
        """``per_class`` hosts are chosen by label: relabelling a scan recomputes its surrogates."""
        return self.host_policy is HostPolicy.PER_CLASS

    @model_validator(mode="after")
    def _check_consistency(self) -> Self:
        lo, hi = self.window_hu
        if not (abs(lo) < 1e5 and abs(hi) < 1e5 and lo < hi):
            raise ValueError(f"window_hu must be finite (low, high) HU with low < high, got {self.window_hu}")
        if self.host_pool is not None and len(set(self.host_pool)) != len(self.host_pool):
            raise ValueError(f"host_pool names must be unique, got {self.host_pool}")
        if (self.variant is SurrogateVariant.AMPLITUDE_NOISE) != (self.amplitude_noise_sigma > 0):
            raise ValueError("amplitude_noise_sigma > 0 goes with variant 'amplitude_noise' and only with it")
        if (self.variant is SurrogateVariant.PRIVATE_PHASE) != (self.private_phase_half_width > 0):
            raise ValueError("private_phase_half_width > 0 goes with variant 'private_phase' and only with it")
        if self.variant is not SurrogateVariant.PAPER and self.iqem.enabled:
            raise ValueError(f"IQEM is implemented for variant 'paper' only, got variant '{self.variant.value}'")
        return self
