"""Privacy parameters of a federated run: the ε of Flower's fixed-clipping DP, and SecAgg+ parameters per cohort.

**Differential privacy.** Flower's fixed-clipping wrappers (server- or client-side) clip every site's update to
L2 norm ``C`` and add Gaussian noise of standard deviation ``σ·C/m`` to the average of the ``m`` sampled
updates. With a fixed denominator ``m`` one site changes that average by at most ``C/m``, so each round is a
Gaussian mechanism with noise multiplier ``σ`` at the level of a whole site (client-level DP). Its Rényi DP
(Mironov 2017) is ``α / (2σ²)`` at every order ``α > 1``, and ``T`` rounds compose additively. The (ε, δ)
conversion is the tighter one of Canonne, Kamath & Steinke (2020) / Balle et al. (2020), the one Opacus and
Google's ``dp-accounting`` use::

    ε = min_α  T·α/(2σ²) + log((α − 1)/α) − (log δ + log α)/(α − 1)

No amplification by sampling is claimed (Flower's own ``RdpAccountant`` also requires
``sampling_method='no-amplification'`` for the fixed-clipping wrappers): with ``fraction_train < 1`` the
value is an upper bound. The bound assumes equal client weights (Flower's accounted path refuses anything
else); FedAvg weighted by slice counts changes one site's influence to ``C·n_i/Σn``.
This is the same accounting model as Flower's accountant, computed in closed form because its backend
(``dp-accounting``, the ``flwr[dp]`` extra) is not installed here.

**SecAgg+.** :func:`secagg_parameters` picks ``num_shares`` (neighbours a client shares its secrets with,
itself included) and ``reconstruction_threshold`` for a cohort of ``n`` clients: ``min(n, max(3, ⌈2·log₂ n⌉))``
shares — SecAgg+'s logarithmic neighbourhood (Bell et al. 2020) rather than SecAgg's complete graph — and a
strict majority of them as the threshold, so fewer than half of a client's neighbours cannot rebuild its masks
and up to ``shares − threshold`` of them may drop out.
"""

from __future__ import annotations

import math

import numpy as np

from tasks.errors import InvalidInputError

#: Rényi orders searched for the (ε, δ) conversion.
_ORDERS = 1.0 + np.geomspace(1e-6, 1e6, 20001)


def gaussian_dp_epsilon(noise_multiplier: float, *, rounds: int, delta: float, sampling_rate: float = 1.0) -> float:
    """ε after ``rounds`` releases of the Gaussian mechanism with ``noise_multiplier`` σ, at ``delta``.

    ``sampling_rate`` (the share of sites asked per round) is checked but gives no amplification: for a rate
    below 1 the result is an upper bound. ``inf`` for σ = 0.

    Raises
    ------
    InvalidInputError
        σ < 0, rounds < 1, δ outside (0, 1) or a sampling rate outside (0, 1].
    """
    if noise_multiplier < 0 or not math.isfinite(noise_multiplier):
        raise InvalidInputError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier}")
    if rounds < 1:
        raise InvalidInputError(f"rounds must be >= 1, got {rounds}")
    if not 0 < delta < 1:
        raise InvalidInputError(f"delta must be in (0, 1), got {delta}")
    if not 0 < sampling_rate <= 1:
        raise InvalidInputError(f"sampling_rate must be in (0, 1], got {sampling_rate}")
    if noise_multiplier == 0:
        return math.inf
    a = _ORDERS
    rdp = rounds * a / (2.0 * noise_multiplier**2)
    eps = rdp + np.log((a - 1.0) / a) - (math.log(delta) + np.log(a)) / (a - 1.0)
    return float(max(0.0, eps.min()))


def secagg_parameters(num_clients: int) -> tuple[int, int]:
    """``(num_shares, reconstruction_threshold)`` of SecAgg+ for a cohort of ``num_clients`` (>= 2)."""
    if num_clients < 2:
        raise InvalidInputError(f"SecAgg+ needs at least 2 clients, got {num_clients}")
    shares = min(num_clients, max(3, math.ceil(2 * math.log2(num_clients))))
    return shares, shares // 2 + 1


__all__ = ["gaussian_dp_epsilon", "secagg_parameters"]
