"""The block-by-block low-rank estimate: value domain, thresholds, block layout, and the per-block passes.

A block is ``t`` consecutive views of a detector tile, a ``t × M`` matrix ``X`` with one row per view. Its
``t × t`` Gram matrix ``X Xᵀ`` is eigendecomposed (float64, batched over all blocks in one ``torch.linalg.eigh``
call), giving ``X = Σ s_i v_i (v_iᵀX)/s_i``; the estimate is ``P X`` with ``P = V diag(w) Vᵀ``, ``w_i ∈ [0, 1]``
the keep/shrink factor of component ``i`` (no left singular vectors are formed). The second pass is an
empirical Wiener filter in the basis of the first estimate ``Ŷ``: ``P = Ĝ (Ĝ + Mσ² I)⁻¹`` with ``Ĝ = Ŷ Ŷᵀ``, one
batched Cholesky. In the centred (automatic) modes ``P`` acts on the block minus its mean view.

:func:`per_block_denoise` runs both passes on a window of views. Overlapping blocks are added back phase by
phase (:func:`_lowrank_pass`): blocks whose first views differ by a multiple of ``t`` (and tiles by a multiple
of the tile) do not overlap, so each phase is one vectorised reshape-and-add and the Python loop runs over the
phases, never over blocks. Where no two blocks overlap (the paper's mode), :func:`_disjoint_pass` rebuilds the
blocks straight into the result. The automatic modes have a faster equivalent in :mod:`._banded`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from schemas.denoise import DenoiseConfig, DenoiseDomain, ThresholdMode

__all__ = [
    "Axis",
    "aggregation_filters",
    "block_axes",
    "centred",
    "disjoint",
    "from_domain",
    "pad_symmetric",
    "per_block_denoise",
    "symmetric_index",
    "to_domain",
    "to_domain_",
]


# ---- domain transforms --------------------------------------------------------------------------------------
def to_domain(line_integrals: torch.Tensor, *, domain: DenoiseDomain, i0_photons: float | None) -> torch.Tensor:
    """Map line integrals to the values the low-rank model denoises (float32; ``line_integrals`` itself in the
    log domain, else a new tensor)."""
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


# ---- shrinkage rules ----------------------------------------------------------------------------------------
def _gd_hard_lambda(beta: float) -> float:
    """Gavish–Donoho optimal hard threshold λ*(β) for known noise (threshold = λ*·sqrt(n)·σ)."""
    return math.sqrt(2 * (beta + 1) + 8 * beta / ((beta + 1) + math.sqrt(beta**2 + 14 * beta + 1)))


def centred(config: DenoiseConfig) -> bool:
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
class Axis:
    """Block layout along one axis: window ``size``, ``step`` between windows (divides size)."""

    size: int
    step: int

    def starts(self, lo: int, hi: int) -> tuple[int, int]:
        """First and number of window starts (multiples of step) whose windows meet ``[lo, hi)``."""
        first = -((-(lo - self.size + 1)) // self.step) * self.step
        last = ((hi - 1) // self.step) * self.step
        return first, (last - first) // self.step + 1


def symmetric_index(lo: int, hi: int, n: int) -> torch.Tensor:
    """Indices ``lo..hi-1`` mirrored into ``[0, n)`` like numpy's ``symmetric`` padding."""
    idx = np.arange(lo, hi) % (2 * n)
    idx = np.where(idx >= n, 2 * n - 1 - idx, idx)
    return torch.from_numpy(idx.astype(np.int64))


def block_axes(config: DenoiseConfig, rows: int, cols: int, *, pilot: bool) -> tuple[Axis, Axis, Axis]:
    """Layouts along views, rows and cols; the pilot (first of two passes) may use coarser strides."""
    two = pilot and config.second_pass
    sv = config.view_stride
    if two:
        sv = config.first_pass_view_stride or config.group_size
    tr = config.tile_rows if config.tile_rows is not None else rows
    tc = config.tile_cols if config.tile_cols is not None else cols
    tr, tc = min(tr, rows), min(tc, cols)
    sr = config.tile_stride_rows if config.tile_stride_rows is not None else tr
    sc = config.tile_stride_cols if config.tile_stride_cols is not None else tc
    if two:
        sc = config.first_pass_tile_stride_cols or tc
    if tr % sr or tc % sc:  # a tile clipped to a small detector: no overlap then
        sr, sc = (tr if tr % sr else sr), (tc if tc % sc else sc)
    return Axis(config.group_size, sv), Axis(tr, sr), Axis(tc, sc)


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


def aggregation_filters(
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
    vax, rax, cax = block_axes(config, rows, cols, pilot=pilot is None)
    v0, nbv = vax.starts(out_lo, out_hi)
    r0, nbr = rax.starts(0, rows)
    c0, nbc = cax.starts(0, cols)
    lo, hi = v0 - first_view, v0 + (nbv - 1) * vax.step + vax.size - first_view
    if lo < 0 or hi > n_ext:
        raise AssertionError(f"view window [{lo}, {hi}) exceeds the extended array of {n_ext} views")
    center = centred(config)
    if not center and disjoint((vax, rax, cax)):
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
    r_idx = symmetric_index(r0, r0 + (nbr - 1) * rax.step + rax.size, rows).to(noisy.device)
    c_idx = symmetric_index(c0, c0 + (nbc - 1) * cax.step + cax.size, cols).to(noisy.device)

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
    proj, weight = aggregation_filters(gram, wiener=pilot is not None, center=center, config=config, sigma=sigma, m=m)
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


def disjoint(axes: tuple[Axis, Axis, Axis]) -> bool:
    """Whether no two blocks of these layouts overlap (every stride equals its window)."""
    return all(a.step == a.size for a in axes)


#: Float64 bytes of one piece of blocks whose Gram matrices are formed together (a few MB: stays in cache).
_GRAM_PIECE_BYTES = 4 * 2**20


def _disjoint_pass(
    noisy: torch.Tensor,
    pilot: torch.Tensor | None,
    *,
    lo: int,
    axes: tuple[Axis, Axis, Axis],
    blocks: tuple[int, int, int],
    keep: tuple[int, int],
    config: DenoiseConfig,
    sigma: float,
) -> torch.Tensor:
    """:func:`_lowrank_pass` for uncentred blocks of which no two overlap (every stride equals its block size).

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
            sub = pad_symmetric(sub, 1, 0, nbr * tr)
        if nbc * tc != cols:
            sub = pad_symmetric(sub, 2, 0, nbc * tc)
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


def pad_symmetric(a: torch.Tensor, dim: int, lo: int, hi: int) -> torch.Tensor:
    """Indices ``lo..hi-1`` of ``a`` along ``dim`` with numpy ``symmetric`` mirroring outside ``[0, n)``."""
    n = a.shape[dim]
    if lo == 0 and hi == n:
        return a
    if -lo > n or hi - n > n:  # wider than the array: the general (slower) gather
        return a.index_select(dim, symmetric_index(lo, hi, n).to(a.device))
    parts = [a.narrow(dim, 0, -lo).flip(dim)] if lo < 0 else []
    parts.append(a.narrow(dim, max(lo, 0), min(hi, n) - max(lo, 0)))
    if hi > n:
        parts.append(a.narrow(dim, 2 * n - hi, hi - n).flip(dim))
    return torch.cat(parts, dim)


def per_block_denoise(
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
    The automatic modes have a faster equivalent, :func:`._banded.banded_denoise`, tested against this one.
    """
    n_core = data.shape[0] - 2 * halo
    ext_first = first_view - halo
    lo, hi = first_view, first_view + n_core
    values = to_domain(data, domain=config.domain, i0_photons=i0_photons)
    pilot = None
    if config.second_pass:
        g = config.group_size - 1
        first = _lowrank_pass(
            values, None, first_view=ext_first, out_lo=lo - g, out_hi=hi + g, config=config, sigma=noise_sigma
        )
        pilot = torch.zeros_like(values)  # views beyond the pilot's are never read
        pilot[halo - g : halo + n_core + g] = first
    est = _lowrank_pass(values, pilot, first_view=ext_first, out_lo=lo, out_hi=hi, config=config, sigma=noise_sigma)
    return from_domain(est, domain=config.domain, i0_photons=i0_photons, counts_floor=config.counts_floor_photons)
