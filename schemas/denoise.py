"""Configuration of the projection-domain denoiser (low rank of neighbouring-view groups, arXiv:2412.06135).

The projections ``(views, rows, cols)`` are cut into blocks of ``views_per_group`` consecutive views times a
detector tile (``tile_rows`` × ``tile_cols`` bins, or the whole view). Each block, seen as a matrix with one
row per view, is nearly low rank because neighbouring views are nearly identical; its singular values are kept
or shrunk by a threshold and the block is rebuilt. Overlapping blocks (``view_stride`` < ``views_per_group``,
``tile_stride_*`` < ``tile_*``) are averaged. See docs/methods.md §1 for the method and our choices.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal, Self

from pydantic import Field, model_validator

from schemas.base import FrozenModel, StageConfig


class ThresholdMode(StrEnum):
    """How the singular values of a block are kept or shrunk."""

    RELATIVE = "relative"  # keep s_i >= value * s_1 (the leading one always); value 1 = rank 1 (the paper)
    ABSOLUTE = "absolute"  # keep s_i >= value, in the domain's units (line integral or Anscombe units)
    AUTO_HARD = "auto_hard"  # Gavish–Donoho optimal hard threshold from the estimated noise σ, times value
    AUTO = "auto"  # Gavish–Donoho optimal (Frobenius) shrinkage from the estimated noise σ (σ scaled by value)


class DenoiseDomain(StrEnum):
    """The values the low-rank model is applied to."""

    LOG = "log"  # the line integrals themselves (noise variance ≈ exp(p)/I0: heteroscedastic)
    ANSCOMBE = "anscombe"  # 2·sqrt(counts + 3/8) with counts = I0·exp(-p): noise variance ≈ 1 everywhere


class ViewBoundary(StrEnum):
    """What lies beyond the first and last view."""

    AUTO = "auto"  # periodic when the geometry covers a full circle, else mirrored
    PERIODIC = "periodic"  # view n_views is view 0 (only for a full 360° scan)
    MIRROR = "mirror"  # symmetric reflection (view -1 is view 0)


#: t where ``views_per_group`` is 'auto' and the geometry unknown; the reference the strides are given against.
NOMINAL_VIEWS_PER_GROUP = 16


class DenoiseConfig(StageConfig):
    """Parameters of the projection denoiser; the defaults are the best mode measured by ``benchmarks/denoise.py``."""

    views_per_group: Annotated[int, Field(ge=2, le=512)] | Literal["auto"] = Field(
        default="auto",
        description="t: consecutive views per block (the block's short side), views. 'auto': the power of two "
        "nearest group_span_deg / the scan's angular step, within 4..32 (NOMINAL_VIEWS_PER_GROUP where the "
        "geometry is unknown), with view_stride and first_pass_view_stride scaled by t / NOMINAL_VIEWS_PER_GROUP "
        "(resolve_group_size). A number is used as given.",
    )
    view_stride: int = Field(
        default=4,
        ge=1,
        le=512,
        description="Views between the first views of consecutive groups, views; equal to views_per_group "
        "gives the paper's non-overlapping groups, smaller values slide the window and average the overlaps. "
        "Must divide views_per_group (NOMINAL_VIEWS_PER_GROUP when 'auto').",
    )
    group_span_deg: float = Field(
        default=4.0,
        gt=0,
        le=360,
        allow_inf_nan=False,
        description="With views_per_group 'auto': the angle a group of views should span, degrees. Unused when "
        "views_per_group is a number.",
    )
    tile_rows: int | None = Field(
        default=16,
        ge=1,
        le=65536,
        description="Detector rows per block, bins (clipped to the rows there are: 1 for a sinogram); None: all "
        "rows (whole view). Neighbouring rows look alike, so a tile of 16 rows shares one t x t Gram: 16x "
        "fewer blocks than single rows at no loss (benchmarks/denoise.py). Rows are never split across chunks.",
    )
    tile_cols: int | None = Field(
        default=32, ge=1, le=65536, description="Detector columns per block, bins; None: all columns (whole view)."
    )
    tile_stride_rows: int | None = Field(
        default=None, ge=1, le=65536, description="Rows between neighbouring tiles, bins; None: tile_rows (no overlap)."
    )
    tile_stride_cols: int | None = Field(
        default=None,
        ge=1,
        le=65536,
        description="Columns between neighbouring tiles, bins; None: tile_cols (no overlap; half-overlapping "
        "tiles gained <= 0.007 dB at twice the blocks). Must divide tile_cols.",
    )
    first_pass_view_stride: int | None = Field(
        default=None,
        ge=1,
        le=512,
        description="With second_pass: view stride of the first (pilot) pass, views; None: views_per_group "
        "(non-overlapping pilot groups: 1/4 of the eigendecompositions of stride 4 at a cost of ~0.01-0.1 dB). "
        "Must divide views_per_group.",
    )
    first_pass_tile_stride_cols: int | None = Field(
        default=None,
        ge=1,
        le=65536,
        description="With second_pass: column stride of the pilot's tiles, bins; None: tile_cols (no overlap). "
        "Must divide tile_cols.",
    )
    threshold_mode: ThresholdMode = Field(default=ThresholdMode.AUTO, description="How singular values are kept.")
    threshold_value: float = Field(
        default=1.0,
        gt=0,
        le=1e12,
        allow_inf_nan=False,
        description="relative: fraction of the leading singular value (0 < v <= 1, dimensionless); absolute: "
        "singular value in the domain's units; auto / auto_hard: multiplier on the estimated noise σ "
        "(1 = theory, 0.1 <= v <= 10).",
    )
    domain: DenoiseDomain = Field(
        default=DenoiseDomain.ANSCOMBE,
        description="log: denoise the line integrals; anscombe: denoise 2·sqrt(I0·exp(-p) + 3/8), which needs "
        "the unattenuated photons per bin I0 (from the scan manifest).",
    )
    second_pass: bool = Field(
        default=True,
        description="Refine with empirical Wiener shrinkage in the basis of the first estimate (doubles the "
        "view halo and roughly the time).",
    )
    weighted_aggregation: bool = Field(
        default=True,
        description="Average overlapping blocks with weights 1/sum(w_i^2) (the block's noise gain) "
        "instead of uniformly.",
    )
    view_boundary: ViewBoundary = Field(default=ViewBoundary.AUTO, description="What lies beyond the end views.")
    counts_floor_photons: float = Field(
        default=0.5,
        gt=0,
        le=1e3,
        allow_inf_nan=False,
        description="anscombe only: denoised counts are clamped to at least this before the log, photons.",
    )
    noise_sample_triplets: int = Field(
        default=64,
        ge=1,
        le=100_000,
        description="Triplets of consecutive views, evenly spaced over the scan, from which the noise σ is "
        "estimated (the same ones however the array is chunked), triplets.",
    )

    @model_validator(mode="after")
    def _check_consistency(self) -> Self:
        t, s = self.group_size, self.view_stride
        if s > t or t % s:
            raise ValueError(f"view_stride ({s}) must divide views_per_group ({t})")
        fs = self.first_pass_view_stride
        if fs is not None and (fs > t or t % fs):
            raise ValueError(f"first_pass_view_stride ({fs}) must divide views_per_group ({t})")
        for name, tile, stride in (
            ("rows", self.tile_rows, self.tile_stride_rows),
            ("cols", self.tile_cols, self.tile_stride_cols),
            ("cols (first pass)", self.tile_cols, self.first_pass_tile_stride_cols),
        ):
            if stride is None:
                continue
            axis = name.split()[0]
            if tile is None:
                raise ValueError(f"the tile stride of {name} ({stride}) needs tile_{axis}; a whole view has none")
            if stride > tile or tile % stride:
                raise ValueError(f"the tile stride of {name} ({stride}) must divide tile_{axis} ({tile})")
        v, mode = self.threshold_value, self.threshold_mode
        if mode is ThresholdMode.RELATIVE and not v <= 1:
            raise ValueError(f"a relative threshold is a fraction of the leading singular value: got {v}, need <= 1")
        if mode in (ThresholdMode.AUTO, ThresholdMode.AUTO_HARD) and not 0.1 <= v <= 10:
            raise ValueError(f"an automatic threshold's value multiplies the noise σ: got {v}, need 0.1..10")
        return self

    @property
    def group_size(self) -> int:
        """t as a number: ``views_per_group``, or NOMINAL_VIEWS_PER_GROUP while it is 'auto' (before
        ``resolve_group_size`` has seen the scan's geometry)."""
        return NOMINAL_VIEWS_PER_GROUP if self.views_per_group == "auto" else self.views_per_group

    @property
    def view_halo(self) -> int:
        """Views each chunk needs on either side so that chunked results equal whole-array ones."""
        return (self.group_size - 1) * (2 if self.second_pass else 1)

    @classmethod
    def paper(cls, *, views_per_group: int = 8, **overrides: object) -> DenoiseConfig:
        """The paper's mode: non-overlapping groups of whole views, rank 1 (relative threshold 1), log domain.

        About 6-10x the default's throughput on 2 cores (``paper_vs_best_throughput`` in ``benchmarks/denoise.py``),
        but rank 1 of whole views blurs: it lost 0.9-4.6 dB of Hann-FBP PSNR against no denoising on three of the
        benchmark's four noisy regimes (the default: -0.07 to +1.94 dB). ``DenoiseConfig()`` is the one to use.
        """
        fields: dict[str, object] = {
            "views_per_group": views_per_group,
            "view_stride": views_per_group,
            "tile_rows": None,
            "tile_cols": None,
            "tile_stride_rows": None,
            "tile_stride_cols": None,
            "threshold_mode": ThresholdMode.RELATIVE,
            "threshold_value": 1.0,
            "domain": DenoiseDomain.LOG,
            "second_pass": False,
            "weighted_aggregation": False,
        }
        fields.update(overrides)
        return cls.model_validate(fields)


class DenoiseRecord(FrozenModel):
    """What one denoising run used, for the provenance record of its output."""

    config_hash: str = Field(pattern=r"^[0-9a-f]{16}$", description="DenoiseConfig.config_hash() of the run.")
    noise_sigma: float = Field(
        ge=0, allow_inf_nan=False, description="Noise σ the automatic threshold used, in the domain's units."
    )
    views_per_group: int | None = Field(
        default=None, ge=2, description="Views per group actually used (after resolve_group_size), views."
    )
    view_stride: int | None = Field(default=None, ge=1, description="View stride actually used, views.")
    periodic_views: bool = Field(description="Whether the view axis wrapped around (full-circle scan).")
    view_halo: int = Field(ge=0, description="Halo along the view axis of each chunk, views.")
    i0_photons: float | None = Field(
        default=None, gt=0, allow_inf_nan=False, description="Unattenuated photons per bin (anscombe domain)."
    )
