"""Detector model: Poisson statistics of the log data, electronic noise, count floor, crosstalk."""

import numpy as np
import pytest

from tasks.demo.acquisition import blur_columns, expected_counts, simulate_counts, simulate_line_integrals
from tasks.errors import InvalidInputError

# Delta-method variance of log(I0/counts): 1/λ (Poisson) or (λ + σ²)/λ² (with electronic noise).
# 200 000 samples per level give a sampling error of the variance of ~0.3 %; the delta method itself is
# off by O(1/λ) (≈ 2 % at λ = 135), so the tolerance is 5 %.
N_REPEATS = 200_000
VAR_RTOL = 0.05


@pytest.mark.parametrize("p", [0.5, 2.0, 4.0])
def test_line_integral_variance_matches_poisson_model(p):
    i0 = 1.0e4
    flat = np.full((N_REPEATS // 100, 100), p, dtype=np.float32)
    li, counts = simulate_line_integrals(flat, i0_photons=i0, rng=np.random.default_rng(0))
    lam = i0 * np.exp(-p)
    assert li.dtype == np.float32
    assert li.shape == flat.shape
    assert counts is not None
    np.testing.assert_allclose(counts.mean(), lam, rtol=0.01)
    np.testing.assert_allclose(counts.var(), lam, rtol=0.02)  # Poisson: variance = mean
    np.testing.assert_allclose(li.var(), 1.0 / lam, rtol=VAR_RTOL)
    assert abs(li.mean() - p) < 3.0 / lam + 5 * np.sqrt(1.0 / lam / li.size)  # bias ≈ 1/(2λ)


def test_electronic_noise_adds_variance_in_counts():
    i0, p, sigma = 2.0e3, 2.0, 20.0
    flat = np.full((2000, 100), p, dtype=np.float32)
    li, counts = simulate_line_integrals(
        flat, i0_photons=i0, rng=np.random.default_rng(1), electronic_noise_counts=sigma
    )
    lam = i0 * np.exp(-p)
    np.testing.assert_allclose(counts.var(), lam + sigma**2, rtol=0.02)
    np.testing.assert_allclose(li.var(), (lam + sigma**2) / lam**2, rtol=VAR_RTOL)
    assert li.var() > 1.5 / lam  # clearly more than photon noise alone


def test_zero_counts_are_clamped_to_the_floor():
    i0 = 1.0e3
    opaque = np.full((50, 40), 30.0, dtype=np.float32)  # e^-30 · 1e3: no photons arrive
    li, counts = simulate_line_integrals(
        opaque, i0_photons=i0, rng=np.random.default_rng(2), electronic_noise_counts=2.0, counts_floor=0.5
    )
    assert counts.min() == 0.0  # never negative: the detector clips at zero
    assert (counts == 0).mean() > 0.4  # electronic noise would push about half below zero
    assert np.isfinite(li).all()
    assert li.max() <= np.log(i0 / 0.5) + 1e-5
    np.testing.assert_allclose(li[counts <= 0.5], np.log(i0 / 0.5), rtol=1e-6)


def test_no_noise_returns_the_input_without_crosstalk():
    p = np.random.default_rng(3).uniform(0, 5, size=(7, 33)).astype(np.float32)
    li, counts = simulate_line_integrals(p, i0_photons=1e4, rng=None)
    assert counts is None
    np.testing.assert_allclose(li, p, atol=1e-5)


def test_same_generator_state_same_counts_and_input_untouched():
    p = np.linspace(0, 3, 64, dtype=np.float32).reshape(4, 16)
    before = p.copy()
    a = simulate_counts(p, i0_photons=1e3, rng=np.random.default_rng(5), electronic_noise_counts=1.0)
    b = simulate_counts(p, i0_photons=1e3, rng=np.random.default_rng(5), electronic_noise_counts=1.0)
    c = simulate_counts(p, i0_photons=1e3, rng=np.random.default_rng(6), electronic_noise_counts=1.0)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(p, before)


def test_crosstalk_keeps_flat_signal_and_spreads_a_spike():
    flat = np.full((3, 20), 7.0, dtype=np.float32)
    np.testing.assert_allclose(blur_columns(flat, crosstalk_fraction=0.1), flat, rtol=1e-6)
    spike = np.zeros(21, dtype=np.float32)
    spike[10] = 1.0
    out = blur_columns(spike, crosstalk_fraction=0.1)
    np.testing.assert_allclose(out[9:12], [0.1, 0.8, 0.1], rtol=1e-6)
    assert out.sum() == pytest.approx(1.0)
    np.testing.assert_array_equal(blur_columns(spike, crosstalk_fraction=0.0), spike)
    # The expected counts are blurred in intensity, not in line integrals.
    p = np.zeros((1, 5))
    p[0, 2] = 10.0
    lam = expected_counts(p, i0_photons=100.0, crosstalk_fraction=0.1)
    np.testing.assert_allclose(lam[0, 1], 0.9 * 100 + 0.1 * 100 * np.exp(-10.0))


@pytest.mark.parametrize("bad", [-0.1, 1.0 / 3.0, 0.5])
def test_bad_crosstalk_is_refused(bad):
    with pytest.raises(InvalidInputError, match="crosstalk_fraction"):
        blur_columns(np.ones(4), crosstalk_fraction=bad)
    with pytest.raises(InvalidInputError, match="crosstalk_fraction"):
        expected_counts(np.ones(4), i0_photons=10.0, crosstalk_fraction=bad)


def test_bad_dose_is_refused():
    with pytest.raises(InvalidInputError, match="i0_photons"):
        simulate_counts(np.ones(3), i0_photons=0.0, rng=np.random.default_rng(0))
    with pytest.raises(InvalidInputError, match="electronic_noise_counts"):
        simulate_counts(np.ones(3), i0_photons=1.0, rng=np.random.default_rng(0), electronic_noise_counts=-1)


def test_noise_on_a_known_object_matches_the_poisson_model_bin_by_bin():
    # Exact line integrals of the analytic Shepp–Logan head (tasks.phantoms), 400 noise draws per bin.
    from schemas.geometry import BeamKind, Geometry, ReconGrid
    from tasks.phantoms import line_integrals, shepp_logan

    grid = ReconGrid(nx_pixels=32, ny_pixels=32, pixel_size_mm=8.0)
    geometry = Geometry(beam=BeamKind.PARALLEL, n_views=8, n_detector_cols=48, detector_pitch_mm=6.0, grid=grid)
    p = line_integrals(shepp_logan(110.0), geometry)
    inside = p > 0.5  # rays through the object (λ from ~I0/e^0.5 down to I0/e^~4)
    i0 = 5.0e3
    rng = np.random.default_rng(9)
    draws = np.stack([simulate_line_integrals(p, i0_photons=i0, rng=rng)[0] for _ in range(400)])
    lam = i0 * np.exp(-p.astype(np.float64))
    ratio = draws.var(axis=0, ddof=1)[inside] / (1.0 / lam[inside])
    # Per bin the variance estimate has a relative std of sqrt(2/399) ≈ 7 %: check the mean ratio to 3 %
    # and that single bins stay within 35 % (5 σ).
    assert inside.sum() > 200
    assert abs(ratio.mean() - 1.0) < 0.03
    assert np.all(np.abs(ratio - 1.0) < 0.35)
    # Mean: the log's bias is about +1/(2λ); allow that plus 5 standard errors of the mean of 400 draws.
    err = np.abs(draws.mean(axis=0) - p)[inside]
    assert np.all(err < 1.0 / lam[inside] + 5.0 * np.sqrt(1.0 / (lam[inside] * 400)))
