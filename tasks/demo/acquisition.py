"""Detector model of the demo scanners: crosstalk blur, Poisson photon noise, electronic noise, log.

For line integrals ``p`` (one value per detector bin) a scanner with ``I0`` unattenuated photons per
bin and view records::

    λ      = blur_cols(I0 · exp(-p))             expected photons (crosstalk spreads the signal
                                                  to the neighbouring columns)
    counts = max(Poisson(λ) + N(0, σ_e²), 0)      photon noise, additive electronic noise; the
                                                  detector reports no negative counts
    p̂      = log(I0 / max(counts, floor))        what the scanner hands on

The blur acts on the expected signal, so the noise of neighbouring bins stays independent (a
simplification: in a real scintillator part of the spread happens after the photons are counted).
Bins with ``counts < floor`` (no photons, or electronic noise pushing them to zero) are clamped to ``floor``
photons before the log, as scanners do, so ``p̂ <= log(I0 / floor)``; see
:func:`tasks.physics.counts_to_line_integrals`.

For ``counts ≫ 1`` the noise of ``p̂`` has variance ``(λ + σ_e²) / λ²`` (delta method). The clip at
zero changes the statistics only where ``λ`` is a few ``σ_e`` or less.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from tasks.errors import InvalidInputError
from tasks.physics import counts_to_line_integrals

FloatArray = npt.NDArray[np.float32]


def blur_columns(signal: npt.ArrayLike, *, crosstalk_fraction: float) -> FloatArray:
    """Convolve along the last axis (detector columns) with ``[a, 1 - 2a, a]``, edges replicated.

    The kernel sums to one, so a flat signal is unchanged. ``crosstalk_fraction = 0`` returns a copy.

    Parameters
    ----------
    signal : array_like, shape (..., cols)
        Intensities (or any signal), any leading shape.
    crosstalk_fraction : float
        ``a``, the share each neighbouring column receives, in ``[0, 1/3)``.
    """
    a = float(crosstalk_fraction)
    if not 0.0 <= a < 1.0 / 3.0:
        raise InvalidInputError(f"crosstalk_fraction must be in [0, 1/3), got {crosstalk_fraction}")
    x = np.asarray(signal, dtype=np.float32)
    if a == 0.0 or x.shape[-1] < 2:
        return np.array(x, dtype=np.float32, copy=True)
    left = np.concatenate([x[..., :1], x[..., :-1]], axis=-1)
    right = np.concatenate([x[..., 1:], x[..., -1:]], axis=-1)
    out: FloatArray = (np.float32(1.0 - 2.0 * a) * x + np.float32(a) * (left + right)).astype(np.float32)
    return out


def expected_counts(
    line_integrals: npt.ArrayLike, *, i0_photons: float, crosstalk_fraction: float = 0.0
) -> npt.NDArray[np.float64]:
    """Noise-free photons per bin ``blur_cols(I0 · exp(-p))``, float64, same shape as the input."""
    if not i0_photons > 0:
        raise InvalidInputError(f"i0_photons must be positive, got {i0_photons}")
    p = np.asarray(line_integrals, dtype=np.float64)
    lam = i0_photons * np.exp(-p)
    a = float(crosstalk_fraction)
    if not 0.0 <= a < 1.0 / 3.0:
        raise InvalidInputError(f"crosstalk_fraction must be in [0, 1/3), got {crosstalk_fraction}")
    if a > 0.0 and lam.shape[-1] > 1:
        left = np.concatenate([lam[..., :1], lam[..., :-1]], axis=-1)
        right = np.concatenate([lam[..., 1:], lam[..., -1:]], axis=-1)
        lam = (1.0 - 2.0 * a) * lam + a * (left + right)
    return lam


def simulate_counts(
    line_integrals: npt.ArrayLike,
    *,
    i0_photons: float,
    rng: np.random.Generator,
    electronic_noise_counts: float = 0.0,
    crosstalk_fraction: float = 0.0,
) -> FloatArray:
    """Detected photons ``Poisson(λ) + N(0, σ_e²)`` with ``λ = blur_cols(I0 · exp(-p))``.

    Parameters
    ----------
    line_integrals : array_like, shape (..., cols)
        Noise-free line integrals ``p`` (dimensionless), columns last.
    i0_photons : float
        Unattenuated photons per bin and view.
    rng : numpy.random.Generator
        The only source of randomness.
    electronic_noise_counts : float
        Std ``σ_e`` of the additive Gaussian noise, photons (0: none).
    crosstalk_fraction : float
        Detector crosstalk, see :func:`blur_columns`.

    Returns
    -------
    ndarray of float32, same shape
        Counts, >= 0 (electronic noise that would push a bin below zero leaves it at 0).
    """
    if electronic_noise_counts < 0:
        raise InvalidInputError(f"electronic_noise_counts must be >= 0, got {electronic_noise_counts}")
    lam = expected_counts(line_integrals, i0_photons=i0_photons, crosstalk_fraction=crosstalk_fraction)
    counts = rng.poisson(lam).astype(np.float64)
    if electronic_noise_counts > 0:
        counts += rng.normal(0.0, electronic_noise_counts, size=counts.shape)
        np.maximum(counts, 0.0, out=counts)  # the detector reports no negative photon counts
    return counts.astype(np.float32)


def simulate_line_integrals(
    line_integrals: npt.ArrayLike,
    *,
    i0_photons: float,
    rng: np.random.Generator | None,
    electronic_noise_counts: float = 0.0,
    crosstalk_fraction: float = 0.0,
    counts_floor: float = 0.5,
) -> tuple[FloatArray, FloatArray | None]:
    """Measured line integrals (and counts) for noise-free line integrals.

    With ``rng=None`` no noise is drawn: the result is ``log(I0 / λ)`` (the blur still applies, the
    floor does not) and no counts are returned.

    Returns
    -------
    line_integrals : ndarray of float32, same shape as the input
        ``log(I0 / max(counts, counts_floor))``.
    counts : ndarray of float32 or None
        The raw counts before the floor (None without noise).
    """
    if rng is None:
        lam = expected_counts(line_integrals, i0_photons=i0_photons, crosstalk_fraction=crosstalk_fraction)
        return np.log(i0_photons / lam).astype(np.float32), None
    counts = simulate_counts(
        line_integrals,
        i0_photons=i0_photons,
        rng=rng,
        electronic_noise_counts=electronic_noise_counts,
        crosstalk_fraction=crosstalk_fraction,
    )
    return counts_to_line_integrals(counts, i0_photons=i0_photons, counts_floor=counts_floor), counts
