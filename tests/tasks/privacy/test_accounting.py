"""The sampled-Gaussian RDP accountant against the definition (numerical integration), the unsampled closed form
and the existing no-amplification accountant."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, stats

from tasks.errors import InvalidInputError
from tasks.federated.privacy import gaussian_dp_epsilon
from tasks.privacy.accounting import epsilon, sampled_gaussian_rdp


def _rdp_by_integration(sigma: float, q: float, alpha: int) -> float:
    """log E_{N(0,σ²)}[((1−q) + q·N(1,σ²)/N(0,σ²))^α] / (α−1): the divergence itself, integrated numerically."""

    def f(z: float) -> float:
        ratio = math.exp((2 * z - 1) / (2 * sigma**2))
        return stats.norm.pdf(z, scale=sigma) * ((1 - q) + q * ratio) ** alpha

    val, _ = integrate.quad(f, -40 * sigma, 40 * sigma, limit=400, points=[0.0, 0.5])
    return math.log(val) / (alpha - 1)


@pytest.mark.parametrize(("sigma", "q", "alpha"), [(1.0, 0.01, 2), (1.0, 0.1, 8), (2.0, 0.3, 16), (0.8, 0.05, 5)])
def test_sampled_rdp_equals_the_divergence_integrated_numerically(sigma, q, alpha):
    got = sampled_gaussian_rdp(sigma, q, [alpha])[0]
    assert got == pytest.approx(_rdp_by_integration(sigma, q, alpha), rel=1e-6)


def test_full_sampling_is_the_gaussian_mechanism_and_matches_the_federated_accountant():
    a = np.arange(2, 40)
    np.testing.assert_allclose(sampled_gaussian_rdp(1.3, 1.0, a), a / (2 * 1.3**2))
    np.testing.assert_allclose(sampled_gaussian_rdp(1.3, 1 - 1e-12, a), a / (2 * 1.3**2), rtol=1e-6)
    for sigma, rounds in [(1.0, 8), (2.0, 50), (5.0, 12)]:
        # the federated accountant searches real orders, this one integers: within a few percent, never below
        mine = epsilon(sigma, rounds=rounds, delta=1e-5)
        theirs = gaussian_dp_epsilon(sigma, rounds=rounds, delta=1e-5)
        assert theirs <= mine <= 1.05 * theirs


def test_sampling_amplifies_and_noise_and_rounds_behave():
    full = epsilon(1.0, rounds=100, delta=1e-5)
    tenth = epsilon(1.0, rounds=100, delta=1e-5, sampling_rate=0.1)
    assert tenth < 0.25 * full
    assert epsilon(2.0, rounds=100, delta=1e-5, sampling_rate=0.1) < tenth
    assert epsilon(1.0, rounds=1000, delta=1e-5, sampling_rate=0.1) > tenth
    # for small q the RDP is O(q²): halving q roughly quarters it
    r1, r2 = sampled_gaussian_rdp(4.0, 0.01, [4])[0], sampled_gaussian_rdp(4.0, 0.005, [4])[0]
    assert r1 / r2 == pytest.approx(4.0, rel=0.05)


@pytest.mark.parametrize(
    "kw",
    [
        {"noise_multiplier": 0.0, "rounds": 1, "delta": 1e-5},
        {"noise_multiplier": 1.0, "rounds": 0, "delta": 1e-5},
        {"noise_multiplier": 1.0, "rounds": 1, "delta": 1.0},
        {"noise_multiplier": 1.0, "rounds": 1, "delta": 1e-5, "sampling_rate": 0.0},
    ],
)
def test_bad_arguments_are_refused(kw):
    sigma = kw.pop("noise_multiplier")
    with pytest.raises(InvalidInputError):
        epsilon(sigma, **kw)
    with pytest.raises(InvalidInputError, match="orders"):
        sampled_gaussian_rdp(1.0, 0.5, [1.5])
