"""The centred (automatic) modes' estimate as one banded filter along views per detector cell.

The detector is cut into cells of ``tile_stride_rows × tile_stride_cols`` bins and laid out once, cell-major
(:class:`Cells`). A block's centred Gram matrix comes from its cells' first differences along views (banded,
``2t`` flops per element), and the rebuild-and-average of all overlapping blocks is linear in the data: one
banded filter of ``2t - view_stride`` taps per output view and cell, applied with one batched matmul per cell.
:func:`banded_denoise` runs both passes this way, from line integrals to line integrals, keeping the data
cell-major throughout. Equal, up to float32 rounding, to :func:`._blocks.per_block_denoise` on the same config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from schemas.denoise import DenoiseConfig, DenoiseDomain
from tasks.denoise.kernels._blocks import Axis, aggregation_filters, block_axes, from_domain, pad_symmetric, to_domain_

__all__ = ["Cells", "banded_denoise"]


def _centring_map(t: int, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``A = (I - J) L`` (t × t): the centred block from its view differences, ``(I - J) X = A D``.

    ``D`` holds the block's first differences along views (``D_j = x_j - x_{j-1}``, row 0 unused), so that
    ``x_i = x_0 + Σ_{1 ≤ j ≤ i} D_j``; the centring ``I - J`` removes ``x_0``.
    """
    lower = torch.tril(torch.ones(t, t, dtype=dtype, device=device))
    lower[:, 0] = 0.0
    return lower - lower.mean(0, keepdim=True)


@dataclass(frozen=True)
class Cells:
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
    def of(cls, rax: Axis, cax: Axis, rows: int, cols: int) -> Cells:
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
                edge = pad_symmetric(pad_symmetric(a, 2, fc * sc, ncc * sc), 1, 0, nrc * sr)
                dst[:, :, :, fc:].copy_(edge.unflatten(1, (nrc, sr)).unflatten(3, (ncc - fc, sc)))
            if fr < nrc:  # the last row cells likewise
                edge = pad_symmetric(a[:, :, : fc * sc], 1, fr * sr, nrc * sr)
                dst[:, fr:, :, :fc].copy_(edge.unflatten(1, (nrc - fr, sr)).unflatten(3, (fc, sc)))
        else:  # tiles overlapping the first row or column: pad first (the general case)
            sub = pad_symmetric(pad_symmetric(a, 1, self.r0, self.r0 + nrc * sr), 2, self.c0, self.c0 + ncc * sc)
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
            fixed = pad_symmetric(strip[:, :, : self.cols - j0 * sc], 2, 0, (ncc - j0) * sc)
            det[:, :, :, j0:].copy_(fixed.unflatten(1, (nrc, sr)).unflatten(3, (ncc - j0, sc)))
        if nrc * sr > self.rows:
            i0 = max(0, (2 * self.rows - nrc * sr) // sr)
            strip = det[:, i0:].reshape(nv, (nrc - i0) * sr, ncc * sc)
            fixed = pad_symmetric(strip[:, : self.rows - i0 * sr], 1, 0, (nrc - i0) * sr)
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


def _cells_of(config: DenoiseConfig, rows: int, cols: int, *, pilot: bool) -> Cells:
    """The cell layout of one pass's tiles (the pilot's when ``pilot``) on a ``rows × cols`` detector."""
    _, rax, cax = block_axes(config, rows, cols, pilot=pilot)
    return Cells.of(rax, cax, rows, cols)


def _banded_cells(
    x: torch.Tensor,
    x_first: int,
    pilot: torch.Tensor | None,
    pilot_first: int,
    *,
    cells: Cells,
    out_lo: int,
    out_hi: int,
    config: DenoiseConfig,
    sigma: float,
    finish: Callable[[torch.Tensor], torch.Tensor] | None = None,
    sink: Callable[[int, torch.Tensor, int], None] | None = None,
) -> tuple[torch.Tensor | None, int]:
    """One pass of the centred (automatic) modes over the views ``[out_lo, out_hi)``, as a banded filter per cell.

    The detector is cut into cells of ``tile_stride_rows × tile_stride_cols`` bins (:class:`Cells`) and the views
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
    vax, rax, cax = block_axes(config, cells.rows, cells.cols, pilot=pilot is None)
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
    proj, weight = aggregation_filters(
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


def banded_denoise(
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

    def laid_out(layout: Cells) -> torch.Tensor:
        x = layout.to_cells(data)
        if config.domain is not DenoiseDomain.LOG:
            for i in range(layout.n_cells):
                to_domain_(x[i], domain=config.domain, i0_photons=i0_photons)
        return x

    x = laid_out(cells)
    pilot, pilot_first = None, 0
    if config.second_pass:
        g = config.group_size - 1
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
