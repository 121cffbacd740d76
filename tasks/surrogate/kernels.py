"""The Image Hidden Module of FESF (arXiv:2403.16473): frequency exchange between a private slice and a host.

For a private image ``x`` and a host ``h`` of the same size ``(H, W)`` with spectra
``X = A_x e^{iP_x}``, ``Y = A_h e^{iP_h}``, the surrogate is

    s = IFFT2( M · ((1 - β) A_h + β A_x) e^{iP_h} + (1 - M) · Y ),

``M`` the centred square of low frequencies ``|k_y| <= b, |k_x| <= b`` with ``b = ⌊α · min(H, W)⌋`` (the FDA
convention, Yang & Soatto 2020; ``α = 0`` gives an empty mask, so nothing is embedded). Outside ``M`` the
spectrum is the host's, so ``s = h + IFFT2(M · (mixed - Y))``: the kernel transforms only what ``M`` touches.
Along the last axis one real FFT per row keeps the ``b + 1`` lowest columns, along the first axis an FFT of
those columns keeps the ``2b + 1`` lowest rows; the correction goes back the same way (an inverse FFT of
``b + 1`` columns, then a zero-padded inverse real FFT per row) and is added to the host. Host blocks are
computed once when one host serves a whole batch.

Intensities: the kernel is unit-agnostic, but private images and hosts must share a range; use
:func:`to_unit_range` for CT slices (HU or 1/mm → dimensionless, air 0, water 0.5 with the default window) and
the host pool (:mod:`tasks.surrogate.hosts`) for hosts in [0, 1].
"""

from __future__ import annotations

import math
from typing import Literal, TypeVar, overload

import numpy as np
import numpy.typing as npt
import torch

from tasks.errors import InvalidInputError

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
    Same kind and shape as ``images``, float32, dimensionless.
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
    return (np.asarray(images, dtype=np.float32) * np.float32(scale) + np.float32(offset)).astype(np.float32)


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
    ky = np.abs(np.fft.fftfreq(h) * h)
    kx = np.abs(np.fft.fftfreq(w) * w)
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


def _low_block(x: torch.Tensor, rows: torch.Tensor, n_cols: int) -> torch.Tensor:
    """Rows ``rows`` and columns ``[0, n_cols)`` of ``rfft2(x)``, ``(..., len(rows), n_cols)`` complex64."""
    f = torch.fft.rfft(x, dim=-1)[..., :n_cols]
    f = torch.fft.fft(f, dim=-2)
    return f.index_select(-2, rows)


def _synthesise(block: torch.Tensor, rows: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """``irfft2`` of a half-spectrum that is zero outside ``block`` (rows ``rows``, the first columns)."""
    h, w = shape
    full = block.new_zeros((*block.shape[:-2], h, block.shape[-1]))
    full.index_copy_(-2, rows, block)
    return torch.fft.irfft(torch.fft.ifft(full, dim=-2), n=w, dim=-1)


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


def _check_finite(name: str, t: torch.Tensor, *, block: torch.Tensor | None = None) -> None:
    """Refuse non-finite values; ``block`` (the low-frequency block of ``t``) makes the check cheap."""
    probe = t if block is None else block
    finite = torch.isfinite(probe)
    if not bool(finite.all()):
        per_slice = finite.reshape(-1, probe.shape[-2] * probe.shape[-1]).all(dim=1)
        first = int(torch.nonzero(~per_slice)[0, 0])
        raise InvalidInputError(f"{name} contain NaN or infinite values (first at slice {first})")


@overload
def hide(
    images: FloatArray, hosts: FloatArray, *, alpha: float, beta: float, device: torch.device | str | None = None
) -> FloatArray: ...
@overload
def hide(
    images: torch.Tensor,
    hosts: torch.Tensor | FloatArray,
    *,
    alpha: float,
    beta: float,
    device: torch.device | str | None = None,
) -> torch.Tensor: ...
def hide(
    images: FloatArray | torch.Tensor,
    hosts: FloatArray | torch.Tensor,
    *,
    alpha: float,
    beta: float,
    device: torch.device | str | None = None,
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

    Returns
    -------
    numpy.ndarray or torch.Tensor
        Surrogates, ``images``' shape, float32; numpy for numpy ``images``, else a tensor on ``device``.
        Where the host's amplitude is exactly 0 inside the mask, the phase is taken as 0.

    Raises
    ------
    InvalidInputError
        α or β out of range, shapes that do not match, non-finite values.
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
    if alpha == 0 or beta == 0:
        _check_finite("images", x)
        _check_finite("hosts", y)
        out = y.expand_as(x).clone()
    else:
        rows = _low_rows(h, b, x.device)
        n_cols = min(b, w // 2) + 1
        fx = _low_block(x, rows, n_cols)
        fy = _low_block(y, rows, n_cols)
        # A NaN or inf anywhere in a slice reaches its DC row and column: checking the block is enough.
        _check_finite("images", x, block=fx)
        _check_finite("hosts", y, block=fy)
        amp_y = fy.abs()
        # Unit phasor of the host; phase 0 where the host has no energy at all.
        phasor = torch.where(amp_y > 0, fy / torch.where(amp_y > 0, amp_y, 1.0), torch.ones_like(fy))
        mixed = ((1.0 - beta) * amp_y + beta * fx.abs()) * phasor
        out = y + _synthesise(mixed - fy, rows, (h, w))
    if was_numpy:
        return out.cpu().numpy()
    return out
