"""The Image Hidden Module of FESF (arXiv:2403.16473): frequency exchange between a private slice and a host.

For a private image ``x`` and a host ``h`` of the same size ``(H, W)`` with spectra
``X = A_x e^{iP_x}``, ``Y = A_h e^{iP_h}``, the surrogate is

    s = IFFT2( M · ((1 - β) A_h + β A_x) e^{iP_h} + (1 - M) · Y ),

``M`` the centred square of low frequencies ``|k_y| <= b, |k_x| <= b`` with ``b = ⌊α · min(H, W)⌋`` (the FDA
convention, Yang & Soatto 2020; ``α = 0`` gives an empty mask, so nothing is embedded). Outside ``M`` the
spectrum is the host's: the kernel transforms only what ``M`` touches. Along the last axis one real FFT per row
keeps the ``b + 1`` lowest columns, along the first axis an FFT of those columns keeps the ``2b + 1`` lowest rows.
Back: the mask's rows of the host's column spectrum (its ``b + 1`` lowest columns, FFT along y) are replaced by
the mixed spectrum, one inverse FFT along y turns those columns back into row spectra, which replace the same
columns of the host's own row spectra, and one inverse real FFT per row gives the surrogate.

Slices go through in chunks of :data:`CHUNK_BYTES`: on a CPU, freshly mapped (page-faulted) intermediates for a
whole batch cost more than the transforms, while chunk-sized ones come back from the allocator's heap (torch's
``out=`` FFTs are no help: they copy through a temporary). With one shared host, chunks come in groups of
:data:`GROUP_CHUNKS`: a group's real FFTs run back to back, and the work on its kept columns is one call per step
for the whole group. That host's spectra are computed once per thread and reused by later calls with an equal host
(a site's secret host comes back with every block). For very small masks the same blocks can be computed as
partial DFTs by matrix products (``method="matmul"``; ``"auto"`` picks by the kept fraction of columns).
:func:`hide_reference` is the formula on the full spectrum, for tests.

Intensities: the kernel is unit-agnostic, but private images and hosts must share a range; use
:func:`to_unit_range` for CT slices (HU or 1/mm → dimensionless, air 0, water 0.5 with the default window) and
the host pool (:mod:`tasks.surrogate.hosts`) for hosts in [0, 1].
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from typing import Literal, TypeVar, overload

import numpy as np
import numpy.typing as npt
import torch

from tasks.device import to_numpy
from tasks.errors import InvalidInputError

__all__ = [
    "CHUNK_BYTES",
    "GROUP_CHUNKS",
    "Method",
    "Variant",
    "check_strengths",
    "hide",
    "hide_reference",
    "hide_variant",
    "low_frequency_half_width",
    "low_frequency_mask",
    "to_unit_range",
]

FloatArray = npt.NDArray[np.float32]
ArrayT = TypeVar("ArrayT", FloatArray, torch.Tensor)


# ---- intensities ---------------------------------------------------------------------------------
def to_unit_range(
    images: ArrayT,
    *,
    unit: Literal["hu", "per_mm"],
    window_hu: tuple[float, float] = (-1000.0, 1000.0),
    water_attenuation_per_mm: float = 0.0192,
) -> ArrayT:
    """Map CT slices to the dimensionless range shared with the hosts.

    ``u = (HU - low) / (high - low)``; 1/mm is first converted to HU, ``HU = 1000 (mu - mu_w) / mu_w``. Values
    outside the window fall outside [0, 1] (not clipped: nothing private is lost before hiding).

    Parameters
    ----------
    images : numpy.ndarray or torch.Tensor
        Any shape, HU or 1/mm.
    unit : {"hu", "per_mm"}
    window_hu : (float, float)
        HU mapped to 0 and 1.
    water_attenuation_per_mm : float
        Water at the effective energy, 1/mm (``unit="per_mm"`` only).

    Returns
    -------
    Same kind and shape as ``images``, float32, dimensionless; always a new array.
    """
    lo, hi = window_hu
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise InvalidInputError(f"window_hu must be finite with low < high, got {window_hu!r}")
    if unit == "per_mm":
        if not (math.isfinite(water_attenuation_per_mm) and water_attenuation_per_mm > 0):
            raise InvalidInputError(f"water_attenuation_per_mm must be positive, got {water_attenuation_per_mm!r}")
        # mu -> HU -> unit range, folded into one affine map.
        scale = 1000.0 / (water_attenuation_per_mm * (hi - lo))
        offset = (-1000.0 - lo) / (hi - lo)
    elif unit == "hu":
        scale, offset = 1.0 / (hi - lo), -lo / (hi - lo)
    else:
        raise InvalidInputError(f"unit must be 'hu' or 'per_mm', got {unit!r}")
    if isinstance(images, torch.Tensor):
        return images.to(torch.float32) * scale + offset
    out = np.multiply(np.asarray(images), np.float32(scale), dtype=np.float32)  # one new array, then in place
    out += np.float32(offset)
    return out


# ---- the mask --------------------------------------------------------------------------------------
def low_frequency_half_width(shape: tuple[int, int], *, alpha: float) -> int:
    """``b = ⌊α · min(H, W)⌋``: the mask keeps frequency bins ``|k_y| <= b`` and ``|k_x| <= b`` (α > 0)."""
    check_strengths(alpha=alpha, beta=0.0)
    return math.floor(alpha * min(shape))


def low_frequency_mask(shape: tuple[int, int], *, alpha: float) -> npt.NDArray[np.bool_]:
    """The mask ``M`` on the full (unshifted, ``numpy.fft.fft2`` order) frequency grid, ``(H, W)`` bool."""
    h, w = shape
    mask = np.zeros((h, w), dtype=bool)
    if alpha == 0:
        return mask
    b = low_frequency_half_width(shape, alpha=alpha)
    # |frequency index| in integers: fftfreq(n) * n is not exact (3 / 20 * 20 > 3), which dropped mask rows.
    ky = np.minimum(np.arange(h), h - np.arange(h))
    kx = np.minimum(np.arange(w), w - np.arange(w))
    mask[np.ix_(ky <= b, kx <= b)] = True
    return mask


def check_strengths(*, alpha: float, beta: float) -> None:
    """Refuse α outside [0, 0.5] and β outside [0, 1] (NaN included)."""
    if not (isinstance(alpha, int | float) and 0.0 <= alpha <= 0.5):
        raise InvalidInputError(f"alpha must lie in [0, 0.5] (0 embeds nothing), got {alpha!r}")
    if not (isinstance(beta, int | float) and 0.0 <= beta <= 1.0):
        raise InvalidInputError(f"beta must lie in [0, 1], got {beta!r}")


def _low_rows(h: int, b: int, device: torch.device) -> torch.Tensor:
    if 2 * b + 1 >= h:
        return torch.arange(h, device=device)
    return torch.cat([torch.arange(b + 1, device=device), torch.arange(h - b, h, device=device)])


#: Input bytes per chunk of the fast path (two 512² slices): intermediates this small are reused from the
#: allocator's heap instead of being mapped (and page-faulted) afresh for every call, and stay in cache between the
#: steps. 1, 2, 4 and 8 MiB measured on 2 CPU cores at 512², interleaved: 2 MiB was fastest.
CHUNK_BYTES = 2 << 20
#: The partial-DFT (matmul) path is used when the kept columns are at most this fraction of the width
#: (``method="auto"``); measured crossover on 2 CPU cores at 512² (benchmarks/surrogate.py, ``speed`` rows).
_MATMUL_MAX_COLUMN_FRACTION = 0.015

#: Chunks per group on the fft path with one shared host: a group's real FFTs along x run back to back, its column
#: work is one call per step, and a group is read whole before its surrogates are written. 4 (8 slices at 512²)
#: measured 1.29x the chunk-at-a-time loop at 8 slices and 1.17-1.32x at 32; a whole batch of 32 as one group ran
#: at 0.79x.
GROUP_CHUNKS = 4

Method = Literal["auto", "fft", "matmul"]
#: The IHM as the paper states it, or one of fedscan's variants (:func:`hide_variant`).
Variant = Literal["paper", "amplitude_noise", "private_phase"]


class _Plan:
    """Everything about one ``(H, W, b)`` transform that does not depend on the data: rows, columns, DFT matrices.

    The mask's block of ``rfft2`` is ``(rfft along x, first n_cols columns) → (DFT along y, the mask's rows)``.
    ``method="fft"`` computes it with FFTs and synthesises the surrogate by one inverse real FFT per row of a
    half-spectrum whose first ``n_cols`` columns are the inverse FFT along y of the surrogate's column spectrum
    (the host's, with the mask's rows replaced), the other columns the host's own row spectra.
    ``method="matmul"`` uses the partial DFT matrices (``W_cols``: ``W × n_cols``, ``W_rows``: ``k × H``) forward,
    and adds ``irfft2`` of the block's change to the host; faster only when ``n_cols`` is a small fraction of ``W``.
    """

    def __init__(self, h: int, w: int, b: int, device: torch.device, method: Method) -> None:
        self.h, self.w = h, w
        self.rows = _low_rows(h, b, device)
        self.n_cols = min(b, w // 2) + 1
        if method == "auto":
            method = "matmul" if self.n_cols <= _MATMUL_MAX_COLUMN_FRACTION * w else "fft"
        self.method = method
        if method == "matmul":
            n = torch.arange(w, dtype=torch.float64)
            k = torch.arange(self.n_cols, dtype=torch.float64)
            ang = 2 * math.pi * torch.outer(n, k) / w  # (W, n_cols)
            self.cos_f = torch.cos(ang).to(device, torch.float32)
            self.sin_f = (-torch.sin(ang)).to(device, torch.float32)  # e^{-iθ} = cos θ - i sin θ
            weight = torch.full((self.n_cols,), 2.0, dtype=torch.float64)
            weight[0] = 1.0
            if w % 2 == 0 and self.n_cols - 1 == w // 2:
                weight[-1] = 1.0  # the Nyquist bin of an even width counts once
            self.cos_b = (torch.cos(ang).T * weight[:, None] / w).to(device, torch.float32)  # (n_cols, W)
            self.sin_b = (-torch.sin(ang).T * weight[:, None] / w).to(device, torch.float32)  # Re(z e^{iθ})
            ky = self.rows.to(torch.float64).cpu()
            m = torch.arange(h, dtype=torch.float64)
            ang_y = 2 * math.pi * torch.outer(ky, m) / h  # (k, H)
            self.rows_f = torch.polar(torch.ones_like(ang_y), -ang_y).to(device, torch.complex64)
            self.rows_b = (torch.polar(torch.ones_like(ang_y), ang_y).T / h).to(device, torch.complex64)

    def forward(self, x: torch.Tensor, *, chunk: int | None = None) -> torch.Tensor:
        """``(c, H, W)`` real → ``(c, len(rows), n_cols)`` complex64, the mask's block of ``rfft2(x)``.

        fft path: the real FFTs along x run ``chunk`` slices at a time, one after another, each keeping only its
        first ``n_cols`` columns, stored as ``(c, n_cols, H)`` so the FFT along y (one call for all ``c``) runs on
        contiguous columns; the block is returned as a transposed view. No ``out=`` FFTs (on the CPU torch computes
        them into a temporary and copies it over).
        """
        c = x.shape[0]
        if self.method == "matmul":
            flat = x.reshape(c * self.h, self.w)
            f = torch.complex(flat @ self.cos_f, flat @ self.sin_f).reshape(c, self.h, self.n_cols)
            return self.rows_f @ f
        step = c if chunk is None else chunk
        cols = x.new_empty((c, self.n_cols, self.h), dtype=torch.complex64)
        for i in range(0, c, step):
            cols[i : i + step] = torch.fft.rfft(x[i : i + step], dim=-1)[..., : self.n_cols].transpose(-1, -2)
        return torch.fft.fft(cols, dim=-1).index_select(-1, self.rows).transpose(-1, -2)


class _Hosts:
    """The hosts of one chunk (or of the whole batch when one host serves it), prepared for :func:`hide`.

    Inside the mask the surrogate's spectrum is ``base + |X| · gain`` with ``base = (1 - β) |Y| e^{i∠Y}`` and
    ``gain = β e^{i∠Y}``. fft path: ``row_spectra`` (``rfft`` along x) and ``column_spectra`` (their first
    ``n_cols`` columns, FFT along y, all rows) are buffers the synthesis writes into; matmul path: ``block``.
    """

    def __init__(
        self, plan: _Plan, hosts: torch.Tensor, *, beta: float, copies: int = 0, column_copies: int = 0
    ) -> None:
        self.shared = copies > 0
        if plan.method == "fft":
            rows = torch.fft.rfft(hosts, dim=-1)
            cols = torch.fft.fft(rows[..., : plan.n_cols], dim=-2)
            self.block = cols.index_select(-2, plan.rows)
            if self.shared:  # one host, reused group after group: its own buffers, a chunk / a group deep
                rows = rows.expand(copies, -1, -1).clone()
                cols = cols.expand(max(column_copies, copies), -1, -1).clone()
            self.row_spectra, self.column_spectra = rows, cols
        else:
            self.block = plan.forward(hosts)
            self.images = hosts
        amp, phasor = _amplitude_phasor(self.block)
        self.base = (1.0 - beta) * amp * phasor
        self.gain = beta * phasor

    def dc(self) -> torch.Tensor:
        """The DC bin of each host: NaN or inf anywhere in a slice makes it non-finite."""
        return self.block[:, 0, 0]

    def surrogates(self, plan: _Plan, block: torch.Tensor, chunk: int) -> Iterator[tuple[int, torch.Tensor]]:
        """``(offset, surrogates)`` of the slices whose private spectra have the mask's block ``block``, ``chunk``
        slices at a time (the matmul path: all at once).

        fft path: the mixed block goes into the mask's rows of the host's column spectra and one inverse FFT along
        y serves all slices; then, chunk by chunk, those columns replace the first ``n_cols`` of the host's row
        spectra and one inverse real FFT per row gives the surrogates. The FFTs along x of a group run back to back:
        with the small steps between every pair of them (one chunk at a time) they ran about 1.2–1.3× slower.
        """
        c = block.shape[0]
        mixed = torch.addcmul(self.base, block.abs(), self.gain)
        if plan.method == "matmul":
            g = (plan.rows_b @ (mixed - self.block)).reshape(c * plan.h, plan.n_cols)  # ifft along y of the change
            out = self.images.expand(c, plan.h, plan.w).clone()
            flat = out.view(c * plan.h, plan.w)
            flat.addmm_(g.real.contiguous(), plan.cos_b).addmm_(g.imag.contiguous(), plan.sin_b)
            yield 0, out
            return
        cols = self.column_spectra[:c]
        cols.index_copy_(-2, plan.rows, mixed)  # the mask's rows; all others stay the host's
        columns = torch.fft.ifft(cols, dim=-2)
        for i in range(0, c, chunk):
            k = min(chunk, c - i)
            rows = self.row_spectra[:k] if self.shared else self.row_spectra[i : i + k]
            rows[..., : plan.n_cols] = columns[i : i + k]
            yield i, torch.fft.irfft(rows, n=plan.w, dim=-1)


class _SharedHostCache(threading.local):
    """The last shared host each thread prepared, with a copy of the host it was prepared from.

    A site hides every block with its one secret host (policy ``fixed``), and preparing it (a real FFT of the host,
    the FFT of its kept columns, amplitude and phase, the synthesis buffers) costs about as much as hiding one
    slice. The buffers are written by every chunk, so each thread keeps its own; reuse needs an equal host
    (``torch.equal`` against the copy: about a fifth of the preparation at 512²), so a host changed in place is
    prepared anew.
    """

    def __init__(self) -> None:
        self.key: tuple[object, ...] | None = None
        self.copies = (0, 0)
        self.host: torch.Tensor | None = None
        self.prepared: _Hosts | None = None


_SHARED_HOST = _SharedHostCache()


def _shared_host(plan: _Plan, host: torch.Tensor, *, beta: float, copies: int, column_copies: int) -> _Hosts:
    """:class:`_Hosts` of one ``(ny, nx)`` host serving a whole batch (row spectra at least ``copies`` slices deep,
    column spectra ``column_copies``), reused from this thread's last call when the host, the transform and β are
    the same."""
    cache = _SHARED_HOST
    key = (plan.h, plan.w, plan.n_cols, len(plan.rows), plan.method, host.device, beta)
    if (
        cache.key == key
        and cache.copies[0] >= copies
        and cache.copies[1] >= column_copies
        and cache.host is not None
        and cache.prepared is not None
        and torch.equal(cache.host, host)
    ):
        return cache.prepared
    if cache.key == key:
        copies, column_copies = max(copies, cache.copies[0]), max(column_copies, cache.copies[1])
    cache.key = cache.host = cache.prepared = None  # a failure below leaves nothing half-made behind
    # Prepared from the kept copy: the matmul path keeps the host image itself, and the caller's memory may change.
    kept = host.clone()
    prepared = _Hosts(plan, kept[None], beta=beta, copies=copies, column_copies=column_copies)
    cache.key, cache.copies, cache.host, cache.prepared = key, (copies, column_copies), kept, prepared
    return prepared


# ---- the kernel ------------------------------------------------------------------------------------
def _as_tensor(name: str, a: FloatArray | torch.Tensor, device: torch.device | None) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        t = a
    else:
        arr = np.asarray(a)
        t = torch.from_numpy(arr if arr.flags.writeable else arr.copy())  # torch refuses read-only views
    if t.is_complex() or not (t.is_floating_point() or t.dtype in (torch.uint8, torch.int16, torch.int32)):
        raise InvalidInputError(f"{name} must be real numbers, got dtype {t.dtype}")
    if t.ndim not in (2, 3):
        raise InvalidInputError(f"{name} must be (ny, nx) or (slices, ny, nx), got shape {tuple(t.shape)}")
    if min(t.shape[-2:]) < 1 or (t.ndim == 3 and t.shape[0] == 0):
        raise InvalidInputError(f"{name} is empty: shape {tuple(t.shape)}")
    return t.to(device=device if device is not None else t.device, dtype=torch.float32)


def _check_finite(name: str, t: torch.Tensor, *, dc: torch.Tensor | None = None) -> None:
    """Refuse non-finite values in ``t`` (``(ny, nx)`` or ``(slices, ny, nx)``), naming the first such slice.

    ``dc``, the slices' DC bins, makes the check cheap: a NaN or inf anywhere in a slice reaches its DC bin, so
    ``t`` is searched only when some DC bin is not finite (which finite values can also cause, by overflow).
    """
    if dc is not None and bool(torch.isfinite(dc).all()):
        return
    finite = torch.isfinite(t).reshape(-1, t.shape[-2] * t.shape[-1]).all(dim=1)
    if not bool(finite.all()):
        first = int(torch.nonzero(~finite)[0, 0])
        raise InvalidInputError(f"{name} contain NaN or infinite values (first at slice {first})")
    if dc is not None:
        raise InvalidInputError(f"{name} are too large: their spectra overflow float32")


def _amplitude_phasor(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Amplitude and unit phasor of a spectrum block; the phase is 0 where the amplitude is exactly 0."""
    amp = block.abs()
    phasor = torch.where(amp > 0, block / torch.where(amp > 0, amp, 1.0), torch.ones_like(block))
    return amp, phasor


def hide_reference(
    images: npt.ArrayLike, hosts: npt.ArrayLike, *, alpha: float, beta: float
) -> npt.NDArray[np.float64]:
    """The IHM written out on the full spectrum in float64 (numpy), for tests: slow, no validation of shapes.

    ``s = Re IFFT2( M · ((1 - β)|H| + β|X|) e^{i∠H} + (1 - M) · H )`` with ``M`` = :func:`low_frequency_mask`.
    """
    check_strengths(alpha=alpha, beta=beta)
    x = np.asarray(images, dtype=np.float64)
    y = np.broadcast_to(np.asarray(hosts, dtype=np.float64), x.shape)
    fx, fy = np.fft.fft2(x), np.fft.fft2(y)
    amp_y = np.abs(fy)
    phasor = np.where(amp_y > 0, fy / np.where(amp_y > 0, amp_y, 1.0), 1.0)
    mixed = ((1.0 - beta) * amp_y + beta * np.abs(fx)) * phasor
    mask = low_frequency_mask(x.shape[-2:], alpha=alpha)
    return np.real(np.fft.ifft2(np.where(mask, mixed, fy)))


@overload
def hide(
    images: FloatArray,
    hosts: FloatArray,
    *,
    alpha: float,
    beta: float,
    device: torch.device | str | None = None,
    method: Method = "auto",
    out: FloatArray | None = None,
) -> FloatArray: ...
@overload
def hide(
    images: torch.Tensor,
    hosts: torch.Tensor | FloatArray,
    *,
    alpha: float,
    beta: float,
    device: torch.device | str | None = None,
    method: Method = "auto",
    out: torch.Tensor | None = None,
) -> torch.Tensor: ...
def hide(
    images: FloatArray | torch.Tensor,
    hosts: FloatArray | torch.Tensor,
    *,
    alpha: float,
    beta: float,
    device: torch.device | str | None = None,
    method: Method = "auto",
    out: FloatArray | torch.Tensor | None = None,
) -> FloatArray | torch.Tensor:
    """Hide private slices in hosts: host phase, low-frequency amplitude mixed with ratio β (the IHM).

    Parameters
    ----------
    images : numpy.ndarray or torch.Tensor
        ``(ny, nx)`` or ``(slices, ny, nx)``, private images in the common intensity range (see
        :func:`to_unit_range`). Not modified.
    hosts : numpy.ndarray or torch.Tensor
        ``(ny, nx)`` (one host for every slice) or ``(slices, ny, nx)`` (one per slice), same range, same
        ``(ny, nx)`` as ``images``: resample first (:func:`tasks.surrogate.hosts.load_host` renders or resamples
        a pool host to any size); this kernel refuses a size mismatch.
    alpha : float
        Mask half-width ``⌊α · min(ny, nx)⌋`` bins, ``0 <= α <= 0.5``; 0 embeds nothing.
    beta : float
        Share of the private amplitude inside the mask, ``0 <= β <= 1``; 0 returns the host.
    device : torch.device or str, optional
        Where to compute; default: where ``images`` lives (the CPU for numpy input).
    method : {"auto", "fft", "matmul"}
        How the mask's block of the spectrum is computed and synthesised: pruned FFTs, or partial DFTs as
        matrix products (faster only for very small masks); ``"auto"`` picks by the kept fraction of columns
        (:data:`_MATMUL_MAX_COLUMN_FRACTION`). All equal :func:`hide_reference` to float32 precision.
    out : numpy.ndarray or torch.Tensor, optional
        Where to write the surrogates, and then the return value: ``images``' shape, float32, C-contiguous, a
        writeable numpy array or a tensor on the compute device. It may be ``images`` itself (the slices are read
        chunk by chunk before their surrogates are written), not ``hosts``. Saves allocating (and first touching) the
        output, which in processes that return freed memory to the system eagerly (Dask workers) costs a
        page fault per 4 KiB on every call. When a batch is refused for a non-finite slice, ``out`` may already
        hold the surrogates of the slices before it (and, written in place, an input too large for float32
        spectra is then reported as non-finite).

    Returns
    -------
    numpy.ndarray or torch.Tensor
        Surrogates, ``images``' shape, float32; numpy for numpy ``images``, else a tensor on ``device``; ``out``
        when given.
        Where the host's amplitude is exactly 0 inside the mask, the phase is taken as 0.

    Raises
    ------
    InvalidInputError
        α or β out of range, shapes that do not match, non-finite values (or values too large for float32
        spectra), an ``out`` that cannot hold the surrogates.
    """
    check_strengths(alpha=alpha, beta=beta)
    was_numpy = not isinstance(images, torch.Tensor)
    dev = torch.device(device) if device is not None else None
    x = _as_tensor("images", images, dev)
    y = _as_tensor("hosts", hosts, x.device)
    if x.shape[-2:] != y.shape[-2:]:
        raise InvalidInputError(
            f"host size {tuple(y.shape[-2:])} differs from image size {tuple(x.shape[-2:])}; "
            "resample the host to the image size first (tasks.surrogate.hosts.load_host)"
        )
    if y.ndim == 3 and (x.ndim != 3 or y.shape[0] != x.shape[0]):
        raise InvalidInputError(
            f"hosts of shape {tuple(y.shape)} must be (ny, nx) or one per slice of images {tuple(x.shape)}"
        )
    h, w = x.shape[-2:]
    b = low_frequency_half_width((h, w), alpha=alpha)
    target = None if out is None else _output_buffer(out, x)
    if alpha == 0 or beta == 0:
        _check_finite("images", x)
        _check_finite("hosts", y)
        result = y.expand_as(x)
        result = result.clone() if target is None else target.copy_(result)
    else:
        if method not in ("auto", "fft", "matmul"):
            raise InvalidInputError(f"method must be 'auto', 'fft' or 'matmul', got {method!r}")
        plan = _Plan(h, w, b, x.device, method)
        x3 = x if x.ndim == 3 else x[None]
        n = x3.shape[0]
        chunk = max(1, CHUNK_BYTES // (4 * h * w))
        # Groups for one shared host only: per-slice hosts would be transformed a group at a time, and with spectra
        # four times a chunk's that ran at 0.6x the chunk-by-chunk loop.
        group = chunk * GROUP_CHUNKS if plan.method == "fft" and y.ndim == 2 else chunk
        # One chunk and no ``out``: its result is the output. Otherwise each is copied into place (an ``out=``
        # FFT would copy too). In place, a group is read whole before any of its surrogates is written.
        out3 = target.view(x3.shape) if target is not None else torch.empty_like(x3) if n > chunk else None
        shared = None
        if y.ndim == 2:
            shared = _shared_host(plan, y, beta=beta, copies=min(chunk, n), column_copies=min(group, n))
            _check_finite("hosts", y, dc=shared.dc())
        dc = x3.new_empty((n,), dtype=torch.complex64)
        host_dc = x3.new_empty((n,), dtype=torch.complex64)
        chunk_result = x3
        for j in range(0, n, group):
            xg = x3[j : j + group]
            g = xg.shape[0]
            block = plan.forward(xg, chunk=chunk)
            dc[j : j + g] = block[:, 0, 0]
            hosts_g = shared if shared is not None else _Hosts(plan, y[j : j + g], beta=beta)
            if shared is None:
                host_dc[j : j + g] = hosts_g.dc()
            for i, chunk_result in hosts_g.surrogates(plan, block, chunk):
                if out3 is not None:
                    out3[j + i : j + i + chunk_result.shape[0]] = chunk_result
        # Checked once at the end: a check per chunk waits for its result (about 0.09 ms per 2-slice chunk at 512²,
        # 5 % of the chunk), while storing the DC bins does not. No surrogate is returned from a refused batch.
        _check_finite("images", x3, dc=dc)
        if shared is None:
            _check_finite("hosts", y, dc=host_dc)
        result = (out3 if out3 is not None else chunk_result).view(x.shape)
    if out is not None:
        return out
    if was_numpy:
        return to_numpy(result)
    return result


def _output_buffer(out: FloatArray | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``out`` as a tensor sharing its memory, refused unless it can hold the surrogates of ``x`` as they are."""
    if isinstance(out, torch.Tensor):
        t = out
    elif isinstance(out, np.ndarray) and out.flags.writeable:
        t = torch.from_numpy(out)
    else:
        raise InvalidInputError(f"out must be a writeable numpy array or a tensor, got {type(out).__name__}")
    if tuple(t.shape) != tuple(x.shape) or t.dtype != torch.float32 or t.device != x.device or not t.is_contiguous():
        raise InvalidInputError(
            f"out must be C-contiguous float32 of shape {tuple(x.shape)} on {x.device}, got {t.dtype} of shape "
            f"{tuple(t.shape)} on {t.device}"
        )
    return t


# ---- variants beyond the paper ---------------------------------------------------------------------
def _conjugate_index(n: int) -> npt.NDArray[np.int64]:
    """Index of ``-k`` for every FFT bin ``k`` of an axis of length ``n``."""
    return (-np.arange(n)) % n


def hide_variant(
    images: npt.ArrayLike,
    hosts: npt.ArrayLike,
    *,
    alpha: float,
    beta: float,
    variant: Variant = "paper",
    noise: npt.ArrayLike | None = None,
    noise_sigma: float = 0.0,
    phase_half_width: int = 0,
) -> FloatArray:
    """The IHM or one of fedscan's variants of it, on the full spectrum (numpy, float64 inside).

    ``"paper"`` is :func:`hide` (the method as stated). The variants change only the mask's block:

    * ``"amplitude_noise"``: the private amplitude is multiplied by ``exp(noise_sigma · n)`` before mixing, ``n``
      the Hermitian-symmetrised ``noise`` (unit variance per bin), so the surrogate stays real. Aimed at linkage:
      the embedded amplitude no longer equals the private one.
    * ``"private_phase"``: inside the lowest ``|k_y|, |k_x| <= phase_half_width`` bins (within the mask) the
      surrogate takes the *private* phase instead of the host's. Aimed at utility: coarse position and shape
      live in the phase of the lowest frequencies; it reveals that too.

    Parameters
    ----------
    images, hosts : array_like
        ``(slices, ny, nx)`` private slices and ``(ny, nx)`` or ``(slices, ny, nx)`` hosts (common range).
    alpha, beta : float
        As :func:`hide`.
    variant : {"paper", "amplitude_noise", "private_phase"}
    noise : array_like, optional
        ``images``' shape, standard normal draws (``"amplitude_noise"`` only; only bins inside the mask are used).
        The caller draws it from a seeded generator, per slice, so chunking does not change the result.
    noise_sigma : float
        Standard deviation of the log-amplitude noise, nepers (``>= 0``).
    phase_half_width : int
        Half-width of the private-phase square, bins (``>= 0``; clipped to the mask's).

    Returns
    -------
    numpy.ndarray
        ``(slices, ny, nx)`` float32 surrogates.

    Raises
    ------
    InvalidInputError
        Unknown variant, a missing or mis-shaped ``noise``, negative strengths, non-3-D images.
    """
    x = np.asarray(images, dtype=np.float64)
    if x.ndim != 3:
        raise InvalidInputError(f"images must be (slices, ny, nx), got shape {x.shape}")
    if variant == "paper":
        return np.asarray(hide(x.astype(np.float32), np.asarray(hosts, dtype=np.float32), alpha=alpha, beta=beta))
    check_strengths(alpha=alpha, beta=beta)
    if variant not in ("amplitude_noise", "private_phase"):
        raise InvalidInputError(f"variant must be 'paper', 'amplitude_noise' or 'private_phase', got {variant!r}")
    y = np.broadcast_to(np.asarray(hosts, dtype=np.float64), x.shape)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise InvalidInputError("images and hosts must be finite")
    fx, fy = np.fft.fft2(x), np.fft.fft2(y)
    amp_x, amp_y = np.abs(fx), np.abs(fy)
    phasor = np.where(amp_y > 0, fy / np.where(amp_y > 0, amp_y, 1.0), 1.0)
    if variant == "amplitude_noise":
        if not (math.isfinite(noise_sigma) and noise_sigma >= 0):
            raise InvalidInputError(f"noise_sigma must be >= 0, got {noise_sigma!r}")
        if noise is None:
            raise InvalidInputError("variant 'amplitude_noise' needs noise: standard normal draws of images' shape")
        n = np.asarray(noise, dtype=np.float64)
        if n.shape != x.shape:
            raise InvalidInputError(f"noise shape {n.shape} differs from images {x.shape}")
        ci, cj = _conjugate_index(x.shape[-2]), _conjugate_index(x.shape[-1])
        flipped = n[:, ci][:, :, cj]
        self_conjugate = (ci[:, None] == np.arange(x.shape[-2])[:, None]) & (cj[None] == np.arange(x.shape[-1]))
        sym = np.where(self_conjugate, n, (n + flipped) / math.sqrt(2.0))  # unit variance, n(-k) = n(k)
        amp_x = amp_x * np.exp(noise_sigma * sym)
    else:
        if not (isinstance(phase_half_width, int) and phase_half_width >= 0):
            raise InvalidInputError(f"phase_half_width must be a non-negative int, got {phase_half_width!r}")
        inner = _square(x.shape[-2:], phase_half_width) & low_frequency_mask(x.shape[-2:], alpha=alpha)
        own = np.where(amp_x > 0, fx / np.where(amp_x > 0, amp_x, 1.0), 1.0)
        phasor = np.where(inner, own, phasor)
    mixed = ((1.0 - beta) * amp_y + beta * amp_x) * phasor
    mask = low_frequency_mask(x.shape[-2:], alpha=alpha)
    return np.real(np.fft.ifft2(np.where(mask, mixed, fy))).astype(np.float32)


def _square(shape: tuple[int, int], half_width: int) -> npt.NDArray[np.bool_]:
    """Bins with ``|k_y| <= half_width`` and ``|k_x| <= half_width`` (unshifted order)."""
    h, w = shape
    ky = np.minimum(np.arange(h), h - np.arange(h))
    kx = np.minimum(np.arange(w), w - np.arange(w))
    return (ky[:, None] <= half_width) & (kx[None, :] <= half_width)
