"""ε of Flower's fixed-clipping DP (closed-form RDP accounting) and SecAgg+ parameters per cohort size."""

from __future__ import annotations

import math

import pytest

from tasks.errors import InvalidInputError
from tasks.federated.privacy import gaussian_dp_epsilon, secagg_parameters


def mironov_bound(sigma: float, rounds: int, delta: float) -> float:
    """Mironov (2017) Prop. 3 minimised over α in closed form: a looser bound than the conversion used."""
    return rounds / (2 * sigma**2) + math.sqrt(2 * rounds * math.log(1 / delta)) / sigma


@pytest.mark.parametrize("sigma", [0.3, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("rounds", [1, 10, 100])
def test_epsilon_is_below_the_classic_rdp_bound_and_not_far_from_it(sigma, rounds):
    eps = gaussian_dp_epsilon(sigma, rounds=rounds, delta=1e-5)
    bound = mironov_bound(sigma, rounds, 1e-5)
    assert 0.7 * bound < eps <= bound


def test_epsilon_grows_with_rounds_and_shrinks_with_noise():
    assert gaussian_dp_epsilon(1.0, rounds=20, delta=1e-5) > gaussian_dp_epsilon(1.0, rounds=10, delta=1e-5)
    assert gaussian_dp_epsilon(2.0, rounds=10, delta=1e-5) < gaussian_dp_epsilon(1.0, rounds=10, delta=1e-5)
    assert gaussian_dp_epsilon(1.0, rounds=10, delta=1e-3) < gaussian_dp_epsilon(1.0, rounds=10, delta=1e-6)
    # no amplification by sampling is claimed: a sampling rate below 1 gives the same (upper) bound
    assert gaussian_dp_epsilon(1.0, rounds=10, delta=1e-5, sampling_rate=0.5) == gaussian_dp_epsilon(
        1.0, rounds=10, delta=1e-5
    )
    assert gaussian_dp_epsilon(0.0, rounds=1, delta=1e-5) == math.inf


@pytest.mark.parametrize(
    "kw", [{"rounds": 0, "delta": 1e-5}, {"rounds": 1, "delta": 1.0}, {"rounds": 1, "delta": 1e-5, "sampling_rate": 0}]
)
def test_epsilon_refuses_bad_arguments(kw):
    with pytest.raises(InvalidInputError):
        gaussian_dp_epsilon(1.0, **kw)
    with pytest.raises(InvalidInputError):
        gaussian_dp_epsilon(-1.0, rounds=1, delta=1e-5)


def test_secagg_parameters_are_a_majority_of_a_logarithmic_neighbourhood():
    seen = {n: secagg_parameters(n) for n in range(2, 200)}
    for n, (shares, threshold) in seen.items():
        assert 2 <= threshold <= shares <= n
        assert threshold > shares / 2  # fewer than half of a client's neighbours cannot unmask it
    assert seen[3] == (3, 2) and seen[10] == (7, 4)
    assert seen[199][0] < 20  # grows like log n, not like n
    with pytest.raises(InvalidInputError):
        secagg_parameters(1)
