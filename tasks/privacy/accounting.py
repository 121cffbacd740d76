"""Rényi-DP accountant of the (sub)sampled Gaussian mechanism, for rounds that ask a random share of the sites.

:func:`tasks.federated.privacy.gaussian_dp_epsilon` accounts rounds that ask every site (or claims no
amplification). When each site takes part in a round independently with probability ``q`` (Poisson sampling)
and its clipped contribution gets Gaussian noise of ``σ`` times the clipping norm, one round is the sampled
Gaussian mechanism. Its Rényi divergence at integer order ``α ≥ 2`` is (Mironov, Talwar & Zhang 2019, §3.3)::

    A_α = Σ_{k=0..α} C(α, k) (1 − q)^(α−k) q^k exp((k² − k) / (2σ²)),    RDP(α) = log(A_α) / (α − 1)

which for ``q = 1`` is the Gaussian mechanism's ``α / (2σ²)`` (Mironov 2017). ``T`` rounds add; the (ε, δ)
conversion is that of Canonne, Kamath & Steinke 2020 (also used by Opacus and ``dp-accounting``)::

    ε = min_α  T·RDP(α) + log((α − 1)/α) − (log δ + log α)/(α − 1)

Only Poisson sampling is amplified here: Flower's strategies draw a fixed number of sites without replacement,
for which this bound is not proven; use ``sampling_rate=1`` for them.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
from scipy.special import gammaln, logsumexp

from tasks.errors import InvalidInputError

#: Integer Rényi orders searched.
ORDERS = np.arange(2, 513)


def _check(noise_multiplier: float, sampling_rate: float) -> None:
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise InvalidInputError(f"noise_multiplier must be finite and > 0, got {noise_multiplier}")
    if not 0 < sampling_rate <= 1:
        raise InvalidInputError(f"sampling_rate must be in (0, 1], got {sampling_rate}")


def sampled_gaussian_rdp(
    noise_multiplier: float, sampling_rate: float, orders: npt.ArrayLike = ORDERS
) -> npt.NDArray[np.float64]:
    """RDP of one round of the sampled Gaussian mechanism at each integer order in ``orders`` (each >= 2).

    Raises
    ------
    InvalidInputError
        σ <= 0, a rate outside (0, 1], or an order that is not an integer >= 2.
    """
    _check(noise_multiplier, sampling_rate)
    a = np.asarray(orders)
    if a.ndim != 1 or a.size == 0 or np.any(a < 2) or np.any(a != np.round(a)):
        raise InvalidInputError("orders must be integers >= 2")
    s2 = noise_multiplier**2
    if sampling_rate == 1:
        return np.asarray(a / (2 * s2), dtype=np.float64)
    lq, l1q = math.log(sampling_rate), math.log1p(-sampling_rate)
    out = np.empty(a.size)
    for i, alpha in enumerate(a.astype(int)):
        k = np.arange(alpha + 1)
        log_binom = gammaln(alpha + 1) - gammaln(k + 1) - gammaln(alpha - k + 1)
        terms = log_binom + (alpha - k) * l1q + k * lq + (k * k - k) / (2 * s2)
        out[i] = logsumexp(terms) / (alpha - 1)
    return out


def epsilon(noise_multiplier: float, *, rounds: int, delta: float, sampling_rate: float = 1.0) -> float:
    """(ε at ``delta``) after ``rounds`` rounds of the sampled Gaussian mechanism (see the module docstring).

    Raises
    ------
    InvalidInputError
        σ <= 0, rounds < 1, δ outside (0, 1) or a sampling rate outside (0, 1].
    """
    _check(noise_multiplier, sampling_rate)
    if rounds < 1:
        raise InvalidInputError(f"rounds must be >= 1, got {rounds}")
    if not 0 < delta < 1:
        raise InvalidInputError(f"delta must be in (0, 1), got {delta}")
    a = ORDERS.astype(np.float64)
    rdp = rounds * sampled_gaussian_rdp(noise_multiplier, sampling_rate, ORDERS)
    eps = rdp + np.log((a - 1) / a) - (math.log(delta) + np.log(a)) / (a - 1)
    return float(max(0.0, eps.min()))


__all__ = ["ORDERS", "epsilon", "sampled_gaussian_rdp"]
