"""Projection-domain denoising by neighbouring-view similarity (low rank of view groups), pure torch/numpy.

Method (arXiv:2412.06135, METHODS.md §1): neighbouring views are nearly identical, so a block of ``t``
consecutive views of a detector tile — a ``t × M`` matrix, one row per view — is nearly low rank. Each block is
rebuilt from its leading singular components; overlapping blocks are averaged.

Numerics: for every block ``X`` (``t × M``) the ``t × t`` Gram matrix ``X Xᵀ`` is eigendecomposed (float64,
batched over all blocks of an array in one ``torch.linalg.eigh`` call), giving ``X = Σ s_i v_i (v_iᵀX)/s_i``.
The estimate is ``P X`` with ``P = V diag(w) Vᵀ``, where ``w_i ∈ [0, 1]`` is the keep/shrink factor of
component ``i`` — no left singular vectors are formed. The optional second pass is an empirical Wiener filter
in the basis of the first estimate ``Ŷ``: ``P = Ĝ (Ĝ + Mσ² I)⁻¹`` with ``Ĝ = Ŷ Ŷᵀ``, one batched Cholesky (no
eigh); the first pass then runs on non-overlapping blocks by default (``first_pass_*_stride``).

The automatic (centred) modes run as :func:`_banded_pass`: the data are laid out once by detector cell (a tile
stride of rows × cols), block Grams come from the cells' view differences (banded, 2t flops per element), and the
rebuild-and-average of all overlapping blocks is one banded filter along views per cell (``2t - stride`` taps),
applied with one batched matmul per cell. The paper's modes keep the per-block path below (:func:`_lowrank_pass`),
where overlaps are added back phase by phase: blocks whose first views differ by a multiple of ``t`` (and tiles by a
multiple of the tile) do not overlap, so each phase is one vectorised reshape-and-add; the Python loop runs over
the ``(t/stride) · (tile/tile_stride)`` phases, never over blocks. Where no blocks overlap (the paper's own mode),
:func:`_disjoint_pass` skips the adding: whole-view blocks are views of the data and the rebuilt blocks are the
result (3.7-4.5x the phase path on a 1440 x 16 x 372 stack, bit-identical).

Blocks are anchored to absolute view indices (group starts at multiples of the stride), so a chunk of views with
a halo of ``config.view_halo`` views on each side gives exactly the rows of the whole-array result:
:func:`denoise_view_window` is the chunk kernel, :func:`denoise_projections` the whole-array one.

Noise model: counts ~ Poisson(I0·exp(-p)), clamped to a small positive floor before the log. In the
``anscombe`` domain the block values are ``2·sqrt(I0·exp(-p) + 3/8)`` (unit noise variance), inverted with the
closed-form exact unbiased inverse of Mäkitalo & Foi (2011).

References
----------
.. [1] arXiv:2412.06135, projection denoising by similarity of neighbouring views (rank-1 SVD of view groups).
.. [2] M. Gavish, D. L. Donoho, "The optimal hard threshold for singular values is 4/√3", IEEE TIT 60 (2014).
.. [3] M. Gavish, D. L. Donoho, "Optimal shrinkage of singular values", IEEE TIT 63 (2017).
.. [4] M. Mäkitalo, A. Foi, "A closed-form approximation of the exact unbiased inverse of the Anscombe
   variance-stabilizing transformation", IEEE TIP 20 (2011).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from schemas.denoise import DenoiseConfig, DenoiseDomain, ThresholdMode, ViewBoundary
from schemas.geometry import Geometry
from tasks.device import to_numpy
from tasks.errors import DeviceUnavailableError, InvalidInputError

#: Line integrals below ``-NEGATIVE_TOLERANCE_SIGMA · σ`` cannot come from noise around an air reading.
NEGATIVE_TOLERANCE_SIGMA = 8.0
#: 1.4826 · MAD estimates a Gaussian σ.
_MAD_TO_SIGMA = 1.482602218505602

FloatArray = npt.NDArray[np.float32]


# ---- validation and small helpers ---------------------------------------------------------------------------
def _as_projections(projections: npt.ArrayLike) -> FloatArray:
    arr = np.asarray(projections)
    if arr.ndim != 3:
        raise InvalidInputError(f"projections must be (views, rows, cols); got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise InvalidInputError(f"projections must be floating-point line integrals; got dtype {arr.dtype}")
    if arr.size == 0:
        raise InvalidInputError(f"projections are empty: shape {arr.shape} (views, rows, cols) has a zero")
    return arr.astype(np.float32, copy=False)


def check_finite(projections: FloatArray, *, view_offset: int = 0) -> None:
    """Raise :class:`InvalidInputError` naming the first view and row that hold a NaN or infinity.

    Parameters
    ----------
    projections : ndarray, shape (views, rows, cols)
        Line integrals.
    view_offset : int
        Absolute index of ``projections[0]`` in the scan (for the message).
    """
    bad = ~np.isfinite(projections)
    if bad.any():
        v, r, c = (int(i) for i in np.argwhere(bad)[0])
        raise InvalidInputError(
            f"projections hold {int(bad.sum())} non-finite value(s); the first is {projections[v, r, c]} "
            f"at view {v + view_offset}, row {r}, col {c}"
        )


def _finite_minimum(values: torch.Tensor, projections: FloatArray, *, view_offset: int = 0) -> float:
    """The smallest of ``values`` (``projections`` as a CPU tensor), refusing NaN/inf: one ``aminmax`` pass (a NaN
    makes both ends NaN), then :func:`check_finite` only to name the first bad value."""
    low, high = (float(v) for v in torch.aminmax(values))
    if not (math.isfinite(low) and math.isfinite(high)):
        check_finite(projections, view_offset=view_offset)
    return low


def check_not_negative(projections: FloatArray, *, tolerance: float, view_offset: int = 0) -> None:
    """Refuse line integrals below ``-tolerance`` (more negative than noise around an air reading can make).

    Parameters
    ----------
    projections : ndarray, shape (views, rows, cols)
        Line integrals (dimensionless).
    tolerance : float
        Largest negative excursion noise can explain, dimensionless (≥ 0).
    view_offset : int
        Absolute index of ``projections[0]`` in the scan (for the message).
    """
    low = projections < -tolerance
    if low.any():
        flat = int(np.argmin(projections))
        v, r, c = np.unravel_index(flat, projections.shape)
        raise InvalidInputError(
            f"{int(low.sum())} line integral(s) lie below -{tolerance:.4g} (the noise tolerance); the most "
            f"negative is {float(projections[v, r, c]):.4g} at view {int(v) + view_offset}, row {int(r)}, "
            f"col {int(c)}: the data are not -log(I/I0) with the right I0 (air calibration?)"
        )


def resolve_periodic(config: DenoiseConfig, geometry: Geometry | None, *, n_views: int) -> bool:
    """Whether the view axis wraps around, from ``config.view_boundary`` and the scan's geometry.

    Raises
    ------
    InvalidInputError
        Periodic views asked for where the geometry does not cover a full circle (or is unknown), or the
        geometry's view count differs from the array's.
    """
    if geometry is not None and geometry.n_views != n_views:
        raise InvalidInputError(f"the geometry has {geometry.n_views} views but the projections have {n_views}")
    full = geometry is not None and geometry.is_full_circle
    if config.view_boundary is ViewBoundary.PERIODIC:
        if not full:
            span = "unknown" if geometry is None else f"{geometry.angular_range_deg} deg"
            raise InvalidInputError(
                f"view_boundary=periodic needs a full-circle scan (360 deg); the angular range is {span}: "
                "use view_boundary=mirror or auto"
            )
        return True
    if config.view_boundary is ViewBoundary.MIRROR:
        return False
    return full


#: Smallest and largest group size the angular span may choose, views.
GROUP_SIZE_RANGE = (4, 32)


def resolve_group_size(config: DenoiseConfig, geometry: Geometry | None) -> DenoiseConfig:
    """The config with ``views_per_group`` chosen from the scan's angular step (``config.group_span_deg``).

    ``t`` is the power of two nearest ``group_span_deg / step`` (step = angular range / views), within
    :data:`GROUP_SIZE_RANGE`; ``view_stride`` (and ``first_pass_view_stride``) keep their ratio to ``t``.
    Unchanged when the span is None or the geometry unknown. Neighbouring views must look alike for the low-rank
    model: a fixed ``t`` spans 16 degrees at 1 degree per view and blurs, while 4 views at 0.25 degrees leave
    most of the noise (benchmarks/denoise.py records the sweep).
    """
    if config.group_span_deg is None or geometry is None:
        return config
    step = geometry.angular_range_deg / geometry.n_views
    lo, hi = GROUP_SIZE_RANGE
    t = int(min(hi, max(lo, 2 ** round(math.log2(max(config.group_span_deg / step, 1.0))))))
    t_old = config.views_per_group
    fields = config.model_dump()
    fields["views_per_group"] = t
    fields["view_stride"] = max(1, t * config.view_stride // t_old)
    if config.first_pass_view_stride is not None:
        fields["first_pass_view_stride"] = max(1, t * config.first_pass_view_stride // t_old)
    while t % fields["view_stride"]:
        fields["view_stride"] -= 1
    while fields["first_pass_view_stride"] is not None and t % fields["first_pass_view_stride"]:
        fields["first_pass_view_stride"] -= 1
    return DenoiseConfig.model_validate(fields)


def check_device(device: str | torch.device) -> torch.device:
    """Turn ``device`` into a :class:`torch.device`, refusing CUDA where there is none."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError(f"device {dev} asked for but torch sees no CUDA device here")
    return dev


def check_view_count(n_views: int, config: DenoiseConfig) -> None:
    if n_views < config.views_per_group:
        raise InvalidInputError(
            f"{n_views} view(s) are fewer than views_per_group={config.views_per_group}: a group needs "
            "that many consecutive views"
        )


def noise_sample_views(n_views: int, *, n_triplets: int) -> npt.NDArray[np.int64]:
    """Indices of the evenly spaced triplets of consecutive views the noise σ is estimated from.

    Depends only on ``n_views`` and ``n_triplets`` (never on chunking). Shape ``(k, 3)``, ``k ≤ n_triplets``.
    """
    if n_views < 3:
        raise InvalidInputError(f"estimating the noise needs at least 3 views; got {n_views}")
    k = min(n_triplets, n_views // 3)
    starts = (np.arange(k, dtype=np.int64) * (n_views - 2)) // k
    return starts[:, None] + np.arange(3, dtype=np.int64)[None, :]


# ---- domain transforms --------------------------------------------------------------------------------------
def to_domain(line_integrals: torch.Tensor, *, domain: DenoiseDomain, i0_photons: float | None) -> torch.Tensor:
    """Map line integrals to the values the low-rank model denoises (float32 → float32, a new tensor)."""
    if domain is DenoiseDomain.LOG:
        return line_integrals
    return to_domain_(line_integrals.clone(), domain=domain, i0_photons=i0_photons)


def to_domain_(values: torch.Tensor, *, domain: DenoiseDomain, i0_photons: float | None) -> torch.Tensor:
    """:func:`to_domain` in place: overwrites and returns ``values``."""
    if domain is DenoiseDomain.LOG:
        return values
    assert i0_photons is not None
    return values.neg_().exp_().mul_(i0_photons).add_(0.375).sqrt_().mul_(2.0)  # 2 sqrt(counts + 3/8)


def from_domain(
    values: torch.Tensor, *, domain: DenoiseDomain, i0_photons: float | None, counts_floor: float
) -> torch.Tensor:
    """Inverse of :func:`to_domain` (Anscombe: the closed-form exact unbiased inverse, counts clamped).

    Overwrites ``values`` in the Anscombe domain (the caller's estimate is not needed afterwards).
    """
    if domain is DenoiseDomain.LOG:
        return values
    assert i0_photons is not None
    z = values.clamp_(min=1.0)
    r = math.sqrt(1.5)
    # 0.25 z² - 0.125 + y (0.25 r + y (-1.375 + 0.625 r y)), y = 1/z (Horner form of Mäkitalo & Foi)
    y = torch.reciprocal(z)
    poly = torch.mul(y, 0.625 * r).add_(-1.375).mul_(y).add_(0.25 * r).mul_(y)
    counts = z.square_().mul_(0.25).add_(poly).sub_(0.125)
    return counts.clamp_(min=counts_floor).reciprocal_().mul_(i0_photons).log_()


def require_i0(config: DenoiseConfig, i0_photons: float | None) -> float | None:
    if config.domain is DenoiseDomain.ANSCOMBE:
        if i0_photons is None or not math.isfinite(i0_photons) or i0_photons <= 0:
            raise InvalidInputError(
                f"domain=anscombe needs the unattenuated photons per bin i0_photons > 0; got {i0_photons}"
            )
        return float(i0_photons)
    return None


# ---- noise level --------------------------------------------------------------------------------------------
def estimate_noise_sigma(
    samples: npt.ArrayLike, *, domain: DenoiseDomain = DenoiseDomain.LOG, i0_photons: float | None = None
) -> float:
    """Noise σ per element, from triplets of consecutive views (robust: MAD of second differences).

    The second difference ``x[v-1] - 2x[v] + x[v+1]`` along views cancels the slowly varying signal and keeps
    white noise with variance ``6σ²``; the median absolute deviation ignores the few edges where the signal
    moves fast.

    Parameters
    ----------
    samples : array_like, shape (k, 3, rows, cols)
        ``k`` triplets of consecutive views of line integrals (see :func:`noise_sample_views`).
    domain, i0_photons
        The domain σ is wanted in (``anscombe`` needs ``i0_photons``).

    Returns
    -------
    float
        σ in the domain's units (≈ 1 in the Anscombe domain when ``i0_photons`` is right).
    """
    arr = np.asarray(samples, dtype=np.float32)
    if arr.ndim != 4 or arr.shape[1] != 3 or arr.size == 0:
        raise InvalidInputError(f"noise samples must be (k, 3, rows, cols), none of them zero; got {arr.shape}")
    values = to_domain(torch.from_numpy(arr), domain=domain, i0_photons=i0_photons).double()
    d2 = (values[:, 0] - 2.0 * values[:, 1] + values[:, 2]).reshape(-1).numpy()
    mad = _lower_median(np.abs(d2 - _lower_median(d2)))
    return float(_MAD_TO_SIGMA * mad / math.sqrt(6.0))


def _lower_median(values: npt.NDArray[np.float64]) -> float:
    """The lower of the two middle values for an even count, as ``torch.median`` (a selection, not a sort: 7x
    faster than ``torch.median`` on the 381k samples of a 16-row stack)."""
    k = (values.size - 1) // 2
    return float(np.partition(values, k)[k])


def estimate_noise_sigma_of(projections: npt.ArrayLike, *, config: DenoiseConfig, i0_photons: float | None) -> float:
    """σ of a whole in-memory scan, from the same view triplets the chunked driver uses."""
    arr = _as_projections(projections)
    idx = noise_sample_views(arr.shape[0], n_triplets=config.noise_sample_triplets)
    return estimate_noise_sigma(arr[idx], domain=config.domain, i0_photons=require_i0(config, i0_photons))


# ---- shrinkage rules ----------------------------------------------------------------------------------------
def _gd_hard_lambda(beta: float) -> float:
    """Gavish–Donoho optimal hard threshold λ*(β) for known noise (threshold = λ*·sqrt(n)·σ)."""
    return math.sqrt(2 * (beta + 1) + 8 * beta / ((beta + 1) + math.sqrt(beta**2 + 14 * beta + 1)))


def _centred(config: DenoiseConfig) -> bool:
    """Whether the automatic thresholds run, on centred blocks (the mean view passes unfiltered)."""
    return config.threshold_mode in (ThresholdMode.AUTO, ThresholdMode.AUTO_HARD)


def _keep_factors(
    s: torch.Tensor, *, mode: ThresholdMode, value: float, sigma: float, n_long: int, n_short: int
) -> torch.Tensor:
    """Factors ``w ∈ [0, 1]`` for singular values ``s`` (…, t), ascending order (as ``eigh`` returns them)."""
    if mode is ThresholdMode.RELATIVE:
        return (s >= value * s[..., -1:]).to(s.dtype)
    if mode is ThresholdMode.ABSOLUTE:
        return (s >= value).to(s.dtype)
    beta = n_short / n_long
    scale = math.sqrt(n_long) * sigma * (value if mode is ThresholdMode.AUTO else 1.0)
    if scale <= 0:  # no noise: keep everything
        return torch.ones_like(s)
    if mode is ThresholdMode.AUTO_HARD:
        return (s >= value * _gd_hard_lambda(beta) * scale).to(s.dtype)
    y = s / scale  # optimal Frobenius shrinkage η(y) = sqrt((y² - β - 1)² - 4β) / y above the bulk edge
    edge = 1.0 + math.sqrt(beta)
    inner = torch.clamp((y**2 - beta - 1.0) ** 2 - 4.0 * beta, min=0.0)
    eta = torch.where(y > edge, torch.sqrt(inner) / torch.clamp(y, min=1e-30), torch.zeros_like(y))
    return eta / torch.clamp(y, min=1e-30)


# ---- the block machinery ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Axis:
    """Block layout along one axis: window ``size``, ``step`` between windows (divides size)."""

    size: int
    step: int

    def starts(self, lo: int, hi: int) -> tuple[int, int]:
        """First and number of window starts (multiples of step) whose windows meet ``[lo, hi)``."""
        first = -((-(lo - self.size + 1)) // self.step) * self.step
        last = ((hi - 1) // self.step) * self.step
        return first, (last - first) // self.step + 1


def _symmetric_index(lo: int, hi: int, n: int) -> torch.Tensor:
    """Indices ``lo..hi-1`` mirrored into ``[0, n)`` like numpy's ``symmetric`` padding."""
    idx = np.arange(lo, hi) % (2 * n)
    idx = np.where(idx >= n, 2 * n - 1 - idx, idx)
    return torch.from_numpy(idx.astype(np.int64))


def _block_axes(config: DenoiseConfig, rows: int, cols: int, *, pilot: bool) -> tuple[_Axis, _Axis, _Axis]:
    """Layouts along views, rows and cols; the pilot (first of two passes) may use coarser strides."""
    two = pilot and config.second_pass
    sv = config.view_stride
    if two:
        sv = config.first_pass_view_stride or config.views_per_group
    tr = config.tile_rows if config.tile_rows is not None else rows
    tc = config.tile_cols if config.tile_cols is not None else cols
    tr, tc = min(tr, rows), min(tc, cols)
    sr = config.tile_stride_rows if config.tile_stride_rows is not None else tr
    sc = config.tile_stride_cols if config.tile_stride_cols is not None else tc
    if two:
        sc = config.first_pass_tile_stride_cols or tc
    if tr % sr or tc % sc:  # a tile clipped to a small detector: no overlap then
        sr, sc = (tr if tr % sr else sr), (tc if tc % sc else sc)
    return _Axis(config.views_per_group, sv), _Axis(tr, sr), _Axis(tc, sc)


#: cuSOLVER's batched eigh failed (internal error) on ~23k 16×16 matrices at once on an H100: split there.
_CUDA_EIGH_BATCH = 4096


def _batched_eigh(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh`` over a batch, in pieces on CUDA."""
    if gram.device.type != "cuda" or gram.shape[0] <= _CUDA_EIGH_BATCH:
        return torch.linalg.eigh(gram)
    parts = [torch.linalg.eigh(g) for g in torch.split(gram, _CUDA_EIGH_BATCH)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _projectors(gram: torch.Tensor, *, wiener: bool, config: DenoiseConfig, sigma: float, m: int) -> torch.Tensor:
    """The blocks' filters ``P`` (B, t, t), float64, from their Gram matrices (B, t, t), float64.

    First pass (``wiener`` False): ``V diag(w) Vᵀ`` from the eigendecomposition of the noisy blocks' Gram, ``w``
    the keep/shrink factors of the threshold. Second pass: the empirical Wiener filter of the pilot's Gram ``Ĝ``,
    ``w_i = e_i / (e_i + Mσ²)`` in its basis, i.e. the matrix function ``P = I - Mσ² (Ĝ + Mσ² I)⁻¹`` (one batched
    Cholesky, no eigh). ``m`` is the number of elements per view of a block.
    """
    t = gram.shape[-1]
    eye = torch.eye(t, dtype=torch.float64, device=gram.device)
    if not wiener:
        lam, vecs = _batched_eigh(gram)
        s = torch.sqrt(torch.clamp(lam, min=0.0))
        w = _keep_factors(
            s,
            mode=config.threshold_mode,
            value=config.threshold_value,
            sigma=sigma,
            n_long=max(t, m),
            n_short=min(t, m),
        )
        return (vecs * w.unsqueeze(-2)) @ vecs.mT  # V diag(w) Vᵀ, (B, t, t)
    if sigma <= 0:
        return eye.expand(gram.shape[0], t, t)
    # Mσ², plus a ridge far above float32 rounding of the Gram (relative 1e-5) so that the factorisation cannot
    # fail where Mσ² is tiny (nearly noise-free data); negligible against Mσ² elsewhere.
    ridge = m * sigma**2 + 1e-5 * gram.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None] + 1e-30
    chol = torch.linalg.cholesky(gram + ridge * eye)
    return eye - ridge * torch.cholesky_inverse(chol)


def _aggregation_filters(
    gram: torch.Tensor, *, wiener: bool, center: bool, config: DenoiseConfig, sigma: float, m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The blocks' filters as applied to the raw block, each scaled by its aggregation weight, and the weights.

    ``center``: ``P`` acts on the centred block and the mean view passes, ``P_total = J + P (I - J)`` with
    ``J = 11ᵀ/t``. With ``config.weighted_aggregation`` a block's weight is ``1 / max(1, ‖P‖_F²)`` (its noise gain
    ``Σ w_i²``), else 1. Returns ``(weight · P_total, weight)``: shapes (B, t, t) and (B,), float64.
    """
    proj = _projectors(gram, wiener=wiener, config=config, sigma=sigma, m=m)
    if center:
        proj = proj - proj.mean(-1, keepdim=True) + 1.0 / gram.shape[-1]
    if not config.weighted_aggregation:
        return proj, torch.ones(proj.shape[0], dtype=torch.float64, device=proj.device)
    weight = 1.0 / (proj**2).sum((-2, -1)).clamp(min=1.0)
    return proj * weight[:, None, None], weight


def _lowrank_pass(
    noisy: torch.Tensor,
    pilot: torch.Tensor | None,
    *,
    first_view: int,
    out_lo: int,
    out_hi: int,
    config: DenoiseConfig,
    sigma: float,
) -> torch.Tensor:
    """Low-rank estimate of views ``[out_lo, out_hi)`` (absolute) from an extended window of views.

    ``noisy`` (and ``pilot``, the first estimate, for the Wiener pass) hold views ``first_view …`` and must
    cover every group that meets the output range. Returns ``(out_hi - out_lo, rows, cols)``.
    """
    n_ext, rows, cols = noisy.shape
    vax, rax, cax = _block_axes(config, rows, cols, pilot=pilot is None)
    v0, nbv = vax.starts(out_lo, out_hi)
    r0, nbr = rax.starts(0, rows)
    c0, nbc = cax.starts(0, cols)
    lo, hi = v0 - first_view, v0 + (nbv - 1) * vax.step + vax.size - first_view
    if lo < 0 or hi > n_ext:
        raise AssertionError(f"view window [{lo}, {hi}) exceeds the extended array of {n_ext} views")
    center = _centred(config)
    if not center and _disjoint((vax, rax, cax)):
        return _disjoint_pass(
            noisy,
            pilot,
            lo=lo,
            axes=(vax, rax, cax),
            blocks=(nbv, nbr, nbc),
            keep=(out_lo - v0, out_hi - v0),
            config=config,
            sigma=sigma,
        )
    r_idx = _symmetric_index(r0, r0 + (nbr - 1) * rax.step + rax.size, rows).to(noisy.device)
    c_idx = _symmetric_index(c0, c0 + (nbc - 1) * cax.step + cax.size, cols).to(noisy.device)

    def blocks_of(a: torch.Tensor) -> torch.Tensor:
        sub = a[lo:hi].index_select(1, r_idx).index_select(2, c_idx)
        b = sub.unfold(0, vax.size, vax.step).unfold(1, rax.size, rax.step).unfold(2, cax.size, cax.step)
        # (nbv, nbr, nbc, t, tr, tc) -> (B, t, M)
        return b.reshape(nbv * nbr * nbc, vax.size, rax.size * cax.size)

    x = blocks_of(noisy)
    t, m = x.shape[1], x.shape[2]
    # Uncentred blocks (the paper's thresholds) are decomposed in float64; centred ones keep float32 until the
    # Gram, whose entries are then small.
    src = x if pilot is None else blocks_of(pilot)
    work = src - src.mean(1, keepdim=True) if center else src.double()
    gram = (work @ work.mT).double()
    proj, weight = _aggregation_filters(gram, wiener=pilot is not None, center=center, config=config, sigma=sigma, m=m)
    est = (proj.to(x.dtype) @ x).reshape(nbv, nbr, nbc, t, rax.size, cax.size)

    shape = (hi - lo, r_idx.numel(), c_idx.numel())
    acc = torch.zeros(shape, dtype=x.dtype, device=x.device)
    pv, pr, pc = vax.size // vax.step, rax.size // rax.step, cax.size // cax.step
    for i in range(pv):  # phases: blocks i, i+pv, … along views do not overlap (likewise for tiles)
        for j in range(pr):
            for k in range(pc):
                e = est[i::pv, j::pr, k::pc]
                a, b, c = e.shape[:3]
                if a == 0 or b == 0 or c == 0:
                    continue
                sl = (
                    slice(i * vax.step, i * vax.step + a * vax.size),
                    slice(j * rax.step, j * rax.step + b * rax.size),
                    slice(k * cax.step, k * cax.step + c * cax.size),
                )
                tgt = acc[sl].unflatten(0, (a, vax.size)).unflatten(2, (b, rax.size)).unflatten(4, (c, cax.size))
                tgt += e.permute(0, 3, 1, 4, 2, 5)
    # Sum of the weights of the blocks covering each element: a box sum of the block-weight grid over the
    # (pv, pr, pc) blocks that cover one (step × step × step) cell, then repeated over the cell.
    wgrid = torch.nn.functional.pad(
        weight.reshape(1, 1, nbv, nbr, nbc), (pc - 1, pc - 1, pr - 1, pr - 1, pv - 1, pv - 1)
    )
    cells = torch.nn.functional.avg_pool3d(wgrid, (pv, pr, pc), stride=1, divisor_override=1)[0, 0]
    wsum = (
        cells.to(x.dtype)
        .repeat_interleave(vax.step, 0)
        .repeat_interleave(rax.step, 1)
        .repeat_interleave(cax.step, 2)[: shape[0], : shape[1], : shape[2]]
    )
    keep = (
        slice(out_lo - v0, out_hi - v0),
        slice(-r0, -r0 + rows),
        slice(-c0, -c0 + cols),
    )
    return acc[keep] / wsum[keep]


def _disjoint(axes: tuple[_Axis, _Axis, _Axis]) -> bool:
    """Whether no two blocks of these layouts overlap (every stride equals its window)."""
    return all(a.step == a.size for a in axes)


#: Float64 bytes of one piece of blocks whose Gram matrices are formed together (a few MB: stays in cache).
_GRAM_PIECE_BYTES = 4 * 2**20


def _disjoint_pass(
    noisy: torch.Tensor,
    pilot: torch.Tensor | None,
    *,
    lo: int,
    axes: tuple[_Axis, _Axis, _Axis],
    blocks: tuple[int, int, int],
    keep: tuple[int, int],
    config: DenoiseConfig,
    sigma: float,
) -> torch.Tensor:
    """:func:`_lowrank_pass` where no two blocks overlap (every stride equals its block size; the paper's mode).

    Each element lies in exactly one block, so there is nothing to add up or weigh: the estimate of a block is
    its rows of the result. Whole-view blocks are views of the data (no copy), the float64 Gram matrices are
    formed a few MB of blocks at a time, and the rebuilt blocks are the result's memory.
    """
    vax, rax, cax = axes
    nbv, nbr, nbc = blocks  # blocks along views (from row lo of noisy), rows and cols (from 0)
    _, rows, cols = noisy.shape
    t, tr, tc = vax.size, rax.size, cax.size

    def blocks_of(a: torch.Tensor) -> torch.Tensor:
        sub = a[lo : lo + nbv * t]
        if nbr * tr != rows:  # the last tile reaches past the detector: mirrored
            sub = _pad_symmetric(sub, 1, 0, nbr * tr)
        if nbc * tc != cols:
            sub = _pad_symmetric(sub, 2, 0, nbc * tc)
        if nbr == 1 and nbc == 1:
            return sub.reshape(nbv, t, tr * tc)  # whole views: a view of contiguous data
        b = sub.reshape(nbv, t, nbr, tr, nbc, tc).permute(0, 2, 4, 1, 3, 5)
        return b.reshape(nbv * nbr * nbc, t, tr * tc)

    x = blocks_of(noisy)
    src = x if pilot is None else blocks_of(pilot)
    n_blocks, m = x.shape[0], x.shape[2]
    gram = torch.empty(n_blocks, t, t, dtype=torch.float64, device=x.device)
    step = max(1, _GRAM_PIECE_BYTES // (8 * t * m))
    for s in range(0, n_blocks, step):
        work = src[s : s + step].double()
        torch.bmm(work, work.mT, out=gram[s : s + step])
    proj = _projectors(gram, wiener=pilot is not None, config=config, sigma=sigma, m=m)
    est = proj.to(x.dtype) @ x
    if nbr == 1 and nbc == 1:
        out = est.view(nbv * t, tr, tc)
    else:
        out = est.view(nbv, nbr, nbc, t, tr, tc).permute(0, 3, 1, 4, 2, 5).reshape(nbv * t, nbr * tr, nbc * tc)
    return out[keep[0] : keep[1], :rows, :cols]


def _pad_symmetric(a: torch.Tensor, dim: int, lo: int, hi: int) -> torch.Tensor:
    """Indices ``lo..hi-1`` of ``a`` along ``dim`` with numpy ``symmetric`` mirroring outside ``[0, n)``."""
    n = a.shape[dim]
    if lo == 0 and hi == n:
        return a
    if -lo > n or hi - n > n:  # wider than the array: the general (slower) gather
        return a.index_select(dim, _symmetric_index(lo, hi, n).to(a.device))
    parts = [a.narrow(dim, 0, -lo).flip(dim)] if lo < 0 else []
    parts.append(a.narrow(dim, max(lo, 0), min(hi, n) - max(lo, 0)))
    if hi > n:
        parts.append(a.narrow(dim, 2 * n - hi, hi - n).flip(dim))
    return torch.cat(parts, dim)


def _centring_map(t: int, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``A = (I - J) L`` (t × t): the centred block from its view differences, ``(I - J) X = A D``.

    ``D`` holds the block's first differences along views (``D_j = x_j - x_{j-1}``, row 0 unused), so that
    ``x_i = x_0 + Σ_{1 ≤ j ≤ i} D_j``; the centring ``I - J`` removes ``x_0``.
    """
    lower = torch.tril(torch.ones(t, t, dtype=dtype, device=device))
    lower[:, 0] = 0.0
    return lower - lower.mean(0, keepdim=True)


@dataclass(frozen=True)
class _Cells:
    """Cell-major layout of a detector for the banded pass.

    The padded rows ``[r0, r0 + nrc·sr)`` are cut into ``nrc`` cells of ``sr`` rows (``sr`` the tile's row stride),
    the padded columns ``[c0, c0 + ncc·sc)`` likewise; rows and columns outside the detector are mirrored. An
    array in this layout is ``(nrc · ncc, views, sr · sc)``: the views of one cell are contiguous.
    """

    rows: int
    cols: int
    r0: int
    nrc: int
    sr: int
    c0: int
    ncc: int
    sc: int

    @classmethod
    def of(cls, rax: _Axis, cax: _Axis, rows: int, cols: int) -> _Cells:
        r0, nbr = rax.starts(0, rows)
        c0, nbc = cax.starts(0, cols)
        nrc, ncc = nbr + rax.size // rax.step - 1, nbc + cax.size // cax.step - 1
        return cls(rows, cols, r0, nrc, rax.step, c0, ncc, cax.step)

    @property
    def n_cells(self) -> int:
        return self.nrc * self.ncc

    @property
    def m(self) -> int:
        return self.sr * self.sc

    def _full(self) -> tuple[int, int]:
        """Cells along rows and columns that lie wholly inside the detector (when the layout starts at 0, 0)."""
        return min(self.nrc, self.rows // self.sr), min(self.ncc, self.cols // self.sc)

    def to_cells(self, a: torch.Tensor) -> torch.Tensor:
        """``(views, rows, cols)`` → ``(cells, views, bins of a cell)``: one strided copy (edges mirrored)."""
        nv, nrc, sr, ncc, sc = a.shape[0], self.nrc, self.sr, self.ncc, self.sc
        out = torch.empty(nrc, ncc, nv, sr, sc, dtype=a.dtype, device=a.device)
        dst = out.permute(2, 0, 3, 1, 4)  # (views, nrc, sr, ncc, sc): a view of out in detector order
        if self.r0 == 0 and self.c0 == 0:
            fr, fc = self._full()
            dst[:, :fr, :, :fc].copy_(a[:, : fr * sr, : fc * sc].unflatten(1, (fr, sr)).unflatten(3, (fc, sc)))
            if fc < ncc:  # the last column cells reach past the detector's edge: mirrored, every row
                edge = _pad_symmetric(_pad_symmetric(a, 2, fc * sc, ncc * sc), 1, 0, nrc * sr)
                dst[:, :, :, fc:].copy_(edge.unflatten(1, (nrc, sr)).unflatten(3, (ncc - fc, sc)))
            if fr < nrc:  # the last row cells likewise
                edge = _pad_symmetric(a[:, :, : fc * sc], 1, fr * sr, nrc * sr)
                dst[:, fr:, :, :fc].copy_(edge.unflatten(1, (nrc - fr, sr)).unflatten(3, (fc, sc)))
        else:  # tiles overlapping the first row or column: pad first (the general case)
            sub = _pad_symmetric(_pad_symmetric(a, 1, self.r0, self.r0 + nrc * sr), 2, self.c0, self.c0 + ncc * sc)
            dst.copy_(sub.unflatten(1, (nrc, sr)).unflatten(3, (ncc, sc)))
        return out.view(self.n_cells, nv, self.m)

    def remirror(self, cells: torch.Tensor) -> torch.Tensor:
        """Refill, in place, the bins beyond the detector's edges from the bins they mirror.

        A pass writes its own estimates into the mirrored bins (the filter of the tile they fall in); the next
        pass must see the mirror of the estimate, as if the estimate had been padded like the data.
        """
        nv, nrc, sr, ncc, sc = cells.shape[1], self.nrc, self.sr, self.ncc, self.sc
        if self.r0 or self.c0:
            cells.copy_(self.to_cells(self.from_cells(cells, 0, nv)))
            return cells
        det = cells.view(nrc, ncc, nv, sr, sc).permute(2, 0, 3, 1, 4)  # (views, nrc, sr, ncc, sc), a view
        if ncc * sc > self.cols:
            j0 = max(0, (2 * self.cols - ncc * sc) // sc)  # the column cells holding the mirrored bins' sources
            strip = det[:, :, :, j0:].reshape(nv, nrc * sr, (ncc - j0) * sc)
            fixed = _pad_symmetric(strip[:, :, : self.cols - j0 * sc], 2, 0, (ncc - j0) * sc)
            det[:, :, :, j0:].copy_(fixed.unflatten(1, (nrc, sr)).unflatten(3, (ncc - j0, sc)))
        if nrc * sr > self.rows:
            i0 = max(0, (2 * self.rows - nrc * sr) // sr)
            strip = det[:, i0:].reshape(nv, (nrc - i0) * sr, ncc * sc)
            fixed = _pad_symmetric(strip[:, : self.rows - i0 * sr], 1, 0, (nrc - i0) * sr)
            det[:, i0:].copy_(fixed.unflatten(1, (nrc - i0, sr)).unflatten(3, (ncc, sc)))
        return cells

    def put_cell(self, res: torch.Tensor, i: int, values: torch.Tensor, first: int) -> None:
        """Write views ``[first, first + len(res))`` of cell ``i`` (``values``: ``(views, bins of a cell)``) into
        ``res`` (``(n, rows, cols)``), the bins inside the detector only: :meth:`from_cells` one cell at a time."""
        top = self.r0 + (i // self.ncc) * self.sr  # detector row and column of the cell's first bin
        left = self.c0 + (i % self.ncc) * self.sc
        r_lo, r_hi = max(0, top), min(self.rows, top + self.sr)
        c_lo, c_hi = max(0, left), min(self.cols, left + self.sc)
        if r_lo >= r_hi or c_lo >= c_hi:
            return
        n = res.shape[0]
        block = values[first : first + n].view(n, self.sr, self.sc)
        res[:, r_lo:r_hi, c_lo:c_hi] = block[:, r_lo - top : r_hi - top, c_lo - left : c_hi - left]

    def from_cells(self, cells: torch.Tensor, first: int, n: int) -> torch.Tensor:
        """Views ``[first, first + n)`` of a cell-major array back to ``(n, rows, cols)`` (the detector only)."""
        nrc, sr, ncc, sc = self.nrc, self.sr, self.ncc, self.sc
        src = cells.view(nrc, ncc, cells.shape[1], sr, sc).permute(2, 0, 3, 1, 4)[first : first + n]
        if self.r0 or self.c0:
            full = src.reshape(n, nrc * sr, ncc * sc)
            return full[:, -self.r0 : -self.r0 + self.rows, -self.c0 : -self.c0 + self.cols]
        fr, fc = self._full()
        res = torch.empty(n, self.rows, self.cols, dtype=cells.dtype, device=cells.device)
        res[:, : fr * sr, : fc * sc].unflatten(1, (fr, sr)).unflatten(3, (fc, sc)).copy_(src[:, :fr, :, :fc])
        if fc < ncc:
            edge = src[:, :, :, fc:].reshape(n, nrc * sr, (ncc - fc) * sc)
            res[:, :, fc * sc :] = edge[:, : self.rows, : self.cols - fc * sc]
        if fr < nrc:
            edge = src[:, fr:, :, :fc].reshape(n, (nrc - fr) * sr, fc * sc)
            res[:, fr * sr :, : fc * sc] = edge[:, : self.rows - fr * sr]
        return res


def _cells_of(config: DenoiseConfig, rows: int, cols: int, *, pilot: bool) -> _Cells:
    """The cell layout of one pass's tiles (the pilot's when ``pilot``) on a ``rows × cols`` detector."""
    _, rax, cax = _block_axes(config, rows, cols, pilot=pilot)
    return _Cells.of(rax, cax, rows, cols)


def _banded_cells(
    x: torch.Tensor,
    x_first: int,
    pilot: torch.Tensor | None,
    pilot_first: int,
    *,
    cells: _Cells,
    out_lo: int,
    out_hi: int,
    config: DenoiseConfig,
    sigma: float,
    finish: Callable[[torch.Tensor], torch.Tensor] | None = None,
    sink: Callable[[int, torch.Tensor, int], None] | None = None,
) -> tuple[torch.Tensor | None, int]:
    """:func:`_lowrank_pass` for the centred (automatic) modes, as one banded filter along views per cell.

    The detector is cut into cells of ``tile_stride_rows × tile_stride_cols`` bins (:class:`_Cells`) and the views
    into cells of ``view_stride`` views; a block is ``pv × pr × pc`` cells. Each block's centred Gram matrix is
    the sum over its spatial cells of the Gram of the cell's view differences (small numbers: float32 keeps
    their precision, whereas the uncentred values of a bright air region would lose the noise to rounding),
    mapped by the fixed ``A = (I - J) L`` (:func:`_centring_map`) in float64. The rebuild-and-average of all
    blocks that cover a cell is linear in the data: ``out = F x`` with ``F`` the weight-normalised sum of the
    blocks' filters, a band of ``2t - stride`` views per output view. So the Grams come from overlapping
    strided windows of the cell-major data (no copies of the windows), and one batched matmul per spatial cell
    applies ``F``; no block is ever rebuilt on its own.

    Parameters
    ----------
    x : Tensor, shape (cells, views, bins of a cell)
        The data in the denoiser's domain, cell-major; ``x[:, 0]`` is absolute view ``x_first``.
    pilot : Tensor, optional
        The first estimate in the same layout (Wiener pass), its view 0 at absolute ``pilot_first``.
    finish : callable, optional
        Applied in place to each cell's output right after it is computed (while it is in cache).
    sink : callable, optional
        ``sink(i, values, first)`` takes cell ``i``'s finished output (its view 0 at absolute ``first``) as soon as
        it is computed, from a buffer the next cell overwrites; nothing is kept then (``out`` is None).

    Returns
    -------
    out : Tensor, shape (cells, views, bins of a cell), or None
        Estimates of whole view cells that cover ``[out_lo, out_hi)`` (None with a ``sink``).
    first : int
        Absolute index of ``out[:, 0]``.
    """
    vax, rax, cax = _block_axes(config, cells.rows, cells.cols, pilot=pilot is None)
    if _cells_of(config, cells.rows, cells.cols, pilot=pilot is None) != cells:
        raise AssertionError("the pass's tiles do not match the cell layout")
    v0, nbv = vax.starts(out_lo, out_hi)
    nbr = rax.starts(0, cells.rows)[1]
    nbc = cax.starts(0, cells.cols)[1]
    t, sv = vax.size, vax.step
    pv, pr, pc = t // sv, rax.size // rax.step, cax.size // cax.step
    nrc, ncc, n_cells, m = cells.nrc, cells.ncc, cells.n_cells, cells.m
    nvc = nbv + pv - 1  # view cells
    lo = v0 - x_first
    if lo < 0 or lo + nvc * sv > x.shape[1]:
        raise AssertionError(f"view window [{lo}, {lo + nvc * sv}) exceeds the {x.shape[1]} views given")
    xs = x[:, lo : lo + nvc * sv]
    if pilot is None:
        source = xs
    else:
        plo = v0 - pilot_first
        if plo < 0 or plo + nvc * sv > pilot.shape[1]:
            raise AssertionError(f"pilot window [{plo}, {plo + nvc * sv}) exceeds its {pilot.shape[1]} views")
        source = pilot[:, plo : plo + nvc * sv]
    dev, dt = x.device, x.dtype

    # Centred Gram matrices of the blocks, (nbr · nbc · nbv, t, t) float64. Banded: each view cell's differences
    # against the next t views' (sv × t per cell, 2t flops per element), summed over a tile's spatial cells, then
    # assembled into the windows' t × t Grams.
    # One cell's differences at a time, in one buffer: a whole-detector array of them would be mapped (and
    # page-faulted) afresh on every call, as large arrays are, and cost more than computing them.
    d = torch.empty((nvc + pv - 1) * sv, m, dtype=dt, device=dev)
    d[0] = 0.0
    d[nvc * sv :] = 0.0  # zero tail: the band's end
    band = torch.empty(n_cells, nvc, sv, t, dtype=dt, device=dev)
    for i in range(n_cells):  # the next t views of each cell: an overlapping strided view, not a copy
        torch.sub(source[i, 1:], source[i, :-1], out=d[1 : nvc * sv])
        torch.bmm(d[: nvc * sv].view(nvc, sv, m), d.unfold(0, t, sv)[:nvc], out=band[i])
    del d
    band = band.reshape(nrc, ncc, nvc, sv, t)
    tiles = band[:nbr, :nbc].clone()
    for p in range(pr):  # a tile's Gram is the sum of its cells'
        for q in range(pc):
            if p or q:
                tiles += band[p : p + nbr, q : q + nbc]
    tiles = tiles.double()
    gd = torch.empty(nbr, nbc, nbv, pv, sv, pv, sv, dtype=torch.float64, device=dev)
    for p in range(pv):  # window k, cells p <= q: the band of cell k + p at offset q - p
        for q in range(p, pv):
            blk = tiles[:, :, p : p + nbv, :, (q - p) * sv : (q - p + 1) * sv]
            gd[:, :, :, p, :, q, :] = blk
            if q > p:
                gd[:, :, :, q, :, p, :] = blk.mT
    amap = _centring_map(t, dtype=torch.float64, device=dev)
    gram = (amap @ gd.reshape(-1, t, t) @ amap.mT).contiguous()

    m_block = rax.size * cax.size
    proj, weight = _aggregation_filters(
        gram, wiener=pilot is not None, center=True, config=config, sigma=sigma, m=m_block
    )
    proj = proj.reshape(nbr, nbc, nbv, t, t)
    weight = weight.reshape(nbr, nbc, nbv)
    # Spread each tile's filter and weight over the spatial cells it covers.
    spread = torch.zeros(nrc, ncc, nbv, t, t, dtype=torch.float64, device=dev)
    wspread = torch.zeros(nrc, ncc, nbv, dtype=torch.float64, device=dev)
    for p in range(pr):
        for q in range(pc):
            spread[p : p + nbr, q : q + nbc] += proj
            wspread[p : p + nbr, q : q + nbc] += weight
    # The band of output view cell a: the blocks k = a - p (p < pv) that cover it, each placed at its views.
    a_lo, a_hi = (out_lo - v0) // sv, (out_hi - 1 - v0) // sv + 1
    na, width = a_hi - a_lo, (2 * pv - 1) * sv
    filt = torch.zeros(nrc, ncc, na, sv, width, dtype=torch.float64, device=dev)
    wsum = torch.zeros(nrc, ncc, na, dtype=torch.float64, device=dev)
    for p in range(pv):
        off = (pv - 1 - p) * sv
        filt[..., off : off + t] += spread[:, :, a_lo - p : a_hi - p, p * sv : (p + 1) * sv, :]
        wsum += wspread[:, :, a_lo - p : a_hi - p]
    filt = (filt / wsum[..., None, None]).to(dt).reshape(n_cells, na, sv, width)
    # With a sink, one cell's buffer serves every cell (no whole-detector array to map and page-fault afresh).
    out = torch.empty(n_cells, na * sv, m, dtype=dt, device=dev) if sink is None else None
    buf = torch.empty(na * sv, m, dtype=dt, device=dev) if sink is not None else None
    first = (a_lo - pv + 1) * sv
    for i in range(n_cells):
        win = xs[i, first : first + (na - 1) * sv + width].unfold(0, width, sv).mT  # (na, width, m), a view
        target = out[i] if out is not None else buf
        assert target is not None
        torch.bmm(filt[i], win, out=target.view(na, sv, m))
        if finish is not None:
            done = finish(target)
            if done.data_ptr() != target.data_ptr():
                target.copy_(done)
        if sink is not None:
            sink(i, target, v0 + a_lo * sv)
    return out, v0 + a_lo * sv


def _banded_denoise(
    data: torch.Tensor,
    *,
    first_view: int,
    out_lo: int,
    out_hi: int,
    config: DenoiseConfig,
    sigma: float,
    i0_photons: float | None,
) -> torch.Tensor:
    """Both passes of the automatic (centred) modes on line integrals, kept cell-major from input to output.

    ``data`` holds views ``first_view …`` (line integrals, not modified). The domain transform runs cell by cell
    right after the layout copy, the pilot stays cell-major for the Wiener pass, and the inverse transform runs on
    each cell's output while it is in cache, right before the cell is written into the result; the view
    differences and the final estimate live in one cell's buffer. A pilot whose tiles differ from the second
    pass's (``first_pass_tile_stride_cols``) is computed in its own cell layout and laid out again.
    Returns ``(out_hi - out_lo, rows, cols)`` in line integrals.
    """
    _, rows, cols = data.shape
    cells = _cells_of(config, rows, cols, pilot=False)

    def laid_out(layout: _Cells) -> torch.Tensor:
        x = layout.to_cells(data)
        if config.domain is not DenoiseDomain.LOG:
            for i in range(layout.n_cells):
                to_domain_(x[i], domain=config.domain, i0_photons=i0_photons)
        return x

    x = laid_out(cells)
    pilot, pilot_first = None, 0
    if config.second_pass:
        g = config.views_per_group - 1
        pilot_cells = _cells_of(config, rows, cols, pilot=True)
        same = pilot_cells == cells
        pilot, pilot_first = _banded_cells(
            x if same else laid_out(pilot_cells),
            first_view,
            None,
            0,
            cells=pilot_cells,
            out_lo=out_lo - g,
            out_hi=out_hi + g,
            config=config,
            sigma=sigma,
        )
        assert pilot is not None
        if same:
            cells.remirror(pilot)
        else:
            pilot = cells.to_cells(pilot_cells.from_cells(pilot, 0, pilot.shape[1]))
    res = torch.empty(out_hi - out_lo, rows, cols, dtype=x.dtype, device=x.device)

    def finish(values: torch.Tensor) -> torch.Tensor:
        return from_domain(
            values, domain=config.domain, i0_photons=i0_photons, counts_floor=config.counts_floor_photons
        )

    def sink(i: int, values: torch.Tensor, first: int) -> None:
        cells.put_cell(res, i, values, out_lo - first)

    _banded_cells(
        x,
        first_view,
        pilot,
        pilot_first,
        cells=cells,
        out_lo=out_lo,
        out_hi=out_hi,
        config=config,
        sigma=sigma,
        finish=finish,
        sink=sink,
    )
    return res


def denoise_view_window(
    window: npt.ArrayLike,
    *,
    first_view: int,
    halo: int,
    config: DenoiseConfig,
    noise_sigma: float,
    i0_photons: float | None = None,
    device: str | torch.device = "cpu",
) -> FloatArray:
    """Denoise the core views of a window that carries ``halo`` extra views on each side (the chunk kernel).

    Parameters
    ----------
    window : array_like, shape (halo + n + halo, rows, cols)
        Line integrals (dimensionless, float32); views beyond the scan's ends already padded (wrapped for a
        full circle, mirrored otherwise).
    first_view : int
        Absolute view index of ``window[halo]`` (groups are anchored to absolute indices).
    halo : int
        Extra views on each side, ``≥ config.view_halo``.
    config : DenoiseConfig
        The denoiser's parameters.
    noise_sigma : float
        Noise σ in the domain's units, estimated once for the whole scan (:func:`estimate_noise_sigma`).
    i0_photons : float, optional
        Unattenuated photons per bin; needed by the ``anscombe`` domain.
    device : str or torch.device
        Where the blocks are computed.

    Returns
    -------
    ndarray, shape (n, rows, cols), float32
        Denoised line integrals of the core views.

    Raises
    ------
    InvalidInputError
        Non-finite values, line integrals more negative than noise allows, a halo too small.
    DeviceUnavailableError
        CUDA asked for where there is none.
    """
    arr = _as_projections(window)
    if halo < config.view_halo:
        raise InvalidInputError(f"halo={halo} views is less than the config needs ({config.view_halo})")
    n_core = arr.shape[0] - 2 * halo
    if n_core <= 0:
        raise InvalidInputError(f"a window of {arr.shape[0]} views has no core views inside a halo of {halo}")
    _check_noise_sigma(noise_sigma)
    i0 = require_i0(config, i0_photons)
    tol = negative_tolerance(config=config, noise_sigma=noise_sigma, i0_photons=i0)
    host = torch.from_numpy(np.ascontiguousarray(arr))
    low = _finite_minimum(host, arr, view_offset=first_view - halo)
    if low < -tol:  # the halo may hold it (then the core passes)
        check_not_negative(arr[halo : halo + n_core], tolerance=tol, view_offset=first_view)
    dev = check_device(device)
    return _denoise_window(
        host.to(dev), first_view=first_view, halo=halo, config=config, noise_sigma=noise_sigma, i0_photons=i0
    )


def _denoise_window(
    data: torch.Tensor,
    *,
    first_view: int,
    halo: int,
    config: DenoiseConfig,
    noise_sigma: float,
    i0_photons: float | None,
) -> FloatArray:
    """:func:`denoise_view_window` on a checked window already on its device (not modified).

    The automatic (centred) modes run as the banded filter (:func:`_banded_denoise`), the paper's thresholds
    block by block (:func:`_per_block_denoise`).
    """
    n_core = data.shape[0] - 2 * halo
    if _centred(config):
        est = _banded_denoise(
            data,
            first_view=first_view - halo,
            out_lo=first_view,
            out_hi=first_view + n_core,
            config=config,
            sigma=noise_sigma,
            i0_photons=i0_photons,
        )
    else:
        est = _per_block_denoise(
            data, first_view=first_view, halo=halo, config=config, noise_sigma=noise_sigma, i0_photons=i0_photons
        )
    return to_numpy(est.to(torch.float32))


def _per_block_denoise(
    data: torch.Tensor,
    *,
    first_view: int,
    halo: int,
    config: DenoiseConfig,
    noise_sigma: float,
    i0_photons: float | None,
) -> torch.Tensor:
    """Both passes block by block (:func:`_lowrank_pass`), for any mode; the core views in line integrals.

    ``data`` is a window of line integrals whose view ``halo`` is absolute view ``first_view`` (not modified).
    The automatic modes have a faster equivalent, :func:`_banded_denoise`, tested against this one.
    """
    n_core = data.shape[0] - 2 * halo
    ext_first = first_view - halo
    lo, hi = first_view, first_view + n_core
    values = to_domain(data, domain=config.domain, i0_photons=i0_photons)
    pilot = None
    if config.second_pass:
        g = config.views_per_group - 1
        first = _lowrank_pass(
            values, None, first_view=ext_first, out_lo=lo - g, out_hi=hi + g, config=config, sigma=noise_sigma
        )
        pilot = torch.zeros_like(values)  # views beyond the pilot's are never read
        pilot[halo - g : halo + n_core + g] = first
    est = _lowrank_pass(values, pilot, first_view=ext_first, out_lo=lo, out_hi=hi, config=config, sigma=noise_sigma)
    return from_domain(est, domain=config.domain, i0_photons=i0_photons, counts_floor=config.counts_floor_photons)


def _pad_index(n: int, *, halo: int, periodic: bool) -> torch.Tensor:
    """The views ``-halo … n + halo - 1`` of an ``n``-view scan: wrapped for a full circle, else mirrored."""
    return torch.arange(-halo, n + halo) % n if periodic else _symmetric_index(-halo, n + halo, n)


def _check_noise_sigma(noise_sigma: float) -> None:
    if not math.isfinite(noise_sigma) or noise_sigma < 0:
        raise InvalidInputError(f"noise_sigma must be finite and >= 0; got {noise_sigma}")


def pad_views(projections: FloatArray, *, halo: int, periodic: bool) -> FloatArray:
    """Pad ``halo`` views on both ends: wrapped for a full circle, else mirrored (numpy ``symmetric``)."""
    return projections[_pad_index(projections.shape[0], halo=halo, periodic=periodic).numpy()]


def denoise_projections(
    projections: npt.ArrayLike,
    *,
    config: DenoiseConfig,
    periodic: bool,
    i0_photons: float | None = None,
    noise_sigma: float | None = None,
    device: str | torch.device = "cpu",
) -> FloatArray:
    """Denoise a whole in-memory scan of line integrals by low rank of neighbouring-view groups.

    Parameters
    ----------
    projections : array_like, shape (views, rows, cols)
        Line integrals ``p = -log(I/I0)`` (dimensionless), float32. Never modified.
    config : DenoiseConfig
        The denoiser's parameters (:meth:`DenoiseConfig.paper` for the paper's mode).
    periodic : bool
        True for a full-circle scan (the view axis wraps around); see :func:`resolve_periodic`.
    i0_photons : float, optional
        Unattenuated photons per bin (needed by the ``anscombe`` domain).
    noise_sigma : float, optional
        Noise σ in the domain's units; estimated from the data (:func:`estimate_noise_sigma_of`) if None.
    device : str or torch.device
        Torch device for the blocks.

    Returns
    -------
    ndarray, shape (views, rows, cols), float32
        Denoised line integrals.

    Raises
    ------
    InvalidInputError
        Not 3-D, NaN/inf (names view and row), line integrals more negative than noise allows (says how many
        and how negative), fewer views than ``views_per_group``, ``anscombe`` without ``i0_photons``.
    DeviceUnavailableError
        CUDA asked for where there is none.

    Notes
    -----
    On pure white noise the paper's mode (rank 1, non-overlapping groups of ``t`` views, blocks of ``M``
    elements) keeps about ``(1 + sqrt(t/M))² / t`` of the noise variance; the automatic modes remove nearly all
    of it.
    """
    arr = _as_projections(projections)
    check_view_count(arr.shape[0], config)
    host = torch.from_numpy(np.ascontiguousarray(arr))
    low = _finite_minimum(host, arr)
    i0 = require_i0(config, i0_photons)
    if noise_sigma is None:
        noise_sigma = estimate_noise_sigma_of(arr, config=config, i0_photons=i0)
    halo = config.view_halo
    dev = check_device(device)
    _check_noise_sigma(noise_sigma)
    tol = negative_tolerance(config=config, noise_sigma=noise_sigma, i0_photons=i0)
    if low < -tol:
        check_not_negative(arr, tolerance=tol)
    if _groups_tile_the_views(config, arr.shape):  # no block reaches past the scan's ends: nothing to pad
        halo, data = 0, host.to(dev)
    elif dev.type == "cuda":  # pad on the device: a padded host copy costs more than the whole denoising there
        data = host.to(dev).index_select(0, _pad_index(arr.shape[0], halo=halo, periodic=periodic).to(dev))
    else:
        data = torch.from_numpy(pad_views(arr, halo=halo, periodic=periodic))
    return _denoise_window(data, first_view=0, halo=halo, config=config, noise_sigma=noise_sigma, i0_photons=i0)


def _groups_tile_the_views(config: DenoiseConfig, shape: tuple[int, ...]) -> bool:
    """Whether a whole scan of ``shape`` needs no views beyond its ends: one pass of uncentred, non-overlapping
    blocks (the paper's mode) whose groups tile the views exactly, so no block reaches past either end."""
    if config.second_pass or _centred(config):
        return False
    views, rows, cols = shape
    return views % config.views_per_group == 0 and _disjoint(_block_axes(config, rows, cols, pilot=False))


def negative_tolerance(*, config: DenoiseConfig, noise_sigma: float, i0_photons: float | None) -> float:
    """Most negative line integral that noise around an air reading can explain (dimensionless).

    Log domain: ``8σ`` with σ the data's own (median) noise level. Anscombe domain: an air reading has
    σ_p ≈ 1/sqrt(I0), scaled by the measured σ when that exceeds its nominal 1.
    """
    if config.domain is DenoiseDomain.ANSCOMBE and i0_photons is not None:
        sigma_p = max(1.0, noise_sigma) / math.sqrt(i0_photons)
    else:
        sigma_p = noise_sigma
    return NEGATIVE_TOLERANCE_SIGMA * sigma_p + 1e-6
