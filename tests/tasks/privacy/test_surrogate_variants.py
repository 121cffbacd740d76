"""The surrogate variants beyond the paper: each reduces to the paper's IHM at zero strength, and the pipeline's
chunked path draws the same noise for any chunking."""

from __future__ import annotations

import numpy as np
import pydantic
import pytest
import scipy.ndimage as ndi

from schemas.surrogate import SurrogateConfig
from tasks.errors import InvalidInputError
from tasks.surrogate.chunked import surrogate_slices
from tasks.surrogate.kernels import hide_reference, hide_variant


def _images(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return ndi.gaussian_filter(rng.random((n, size, size)), (0, 1.5, 1.5)).astype(np.float32)


def test_zero_strength_variants_are_the_paper():
    x, h = _images(3), _images(1, seed=1)[0]
    ref = hide_reference(x, h, alpha=0.2, beta=0.5)
    noise = np.random.default_rng(2).standard_normal(x.shape)
    noisy = hide_variant(x, h, alpha=0.2, beta=0.5, variant="amplitude_noise", noise=noise, noise_sigma=0.0)
    phase = hide_variant(x, h, alpha=0.2, beta=0.5, variant="private_phase", phase_half_width=0)
    paper = hide_variant(x, h, alpha=0.2, beta=0.5)
    for out in (noisy, paper):
        np.testing.assert_allclose(out, ref, atol=1e-5)
    # k0 = 0 keeps the private phase of the DC bin only, whose phase is 0 for both (positive means): the same
    np.testing.assert_allclose(phase, ref, atol=1e-5)


def test_private_phase_over_the_whole_spectrum_returns_the_private_image():
    x, h = _images(2), _images(1, seed=1)[0]
    out = hide_variant(x, h, alpha=0.5, beta=1.0, variant="private_phase", phase_half_width=64)
    np.testing.assert_allclose(out, x, atol=1e-5)


def test_amplitude_noise_changes_the_embedded_amplitude_and_stays_real():
    x, h = _images(2), _images(1, seed=1)[0]
    noise = np.random.default_rng(3).standard_normal(x.shape)
    out = hide_variant(x, h, alpha=0.2, beta=0.5, variant="amplitude_noise", noise=noise, noise_sigma=1.0)
    ref = hide_reference(x, h, alpha=0.2, beta=0.5)
    assert np.isfinite(out).all() and out.dtype == np.float32
    assert np.abs(out - ref).max() > 1e-2
    # Hermitian-symmetric noise: the inverse FFT is real, so re-hiding the result's own spectrum loses nothing
    spec = np.fft.fft2(out.astype(np.float64))
    np.testing.assert_allclose(np.real(np.fft.ifft2(spec)), out, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"variant": "amplitude_noise", "noise_sigma": 1.0}, "needs noise"),
        ({"variant": "amplitude_noise", "noise": np.zeros((1, 4, 4)), "noise_sigma": 1.0}, "noise shape"),
        ({"variant": "private_phase", "phase_half_width": -1}, "phase_half_width"),
        ({"variant": "rotate"}, "variant must be"),
    ],
)
def test_bad_variant_arguments_refused(kwargs, match):
    x, h = _images(2), _images(1, seed=1)[0]
    with pytest.raises(InvalidInputError, match=match):
        hide_variant(x, h, alpha=0.2, beta=0.5, **kwargs)


def test_config_pairs_each_variant_with_its_strength():
    assert SurrogateConfig().variant.value == "paper"
    SurrogateConfig(variant="amplitude_noise", amplitude_noise_sigma=1.0)
    SurrogateConfig(variant="private_phase", private_phase_half_width=1)
    for bad in (
        {"variant": "amplitude_noise"},
        {"amplitude_noise_sigma": 1.0},
        {"variant": "private_phase"},
        {"private_phase_half_width": 2},
        {"variant": "private_phase", "private_phase_half_width": 1, "iqem": {"enabled": True}},
    ):
        with pytest.raises(pydantic.ValidationError):
            SurrogateConfig.model_validate(bad)


def test_chunked_noise_variant_is_independent_of_chunking_and_seeded():
    hu = (_images(6, size=16) * 2000 - 1000).astype(np.float32)
    cfg = SurrogateConfig(alpha=0.2, variant="amplitude_noise", amplitude_noise_sigma=1.0, host_seed=5)
    whole = surrogate_slices(hu, config=cfg, site_id="A")
    parts = np.concatenate(
        [
            surrogate_slices(hu[:2], config=cfg, site_id="A"),
            surrogate_slices(hu[2:], config=cfg, site_id="A", first_slice=2),
        ]
    )
    np.testing.assert_array_equal(whole, parts)
    other_seed = surrogate_slices(hu, config=cfg.model_copy(update={"host_seed": 6}), site_id="A")
    paper = surrogate_slices(hu, config=SurrogateConfig(alpha=0.2, host_seed=5), site_id="A")
    assert np.abs(whole - paper).max() > 1e-3
    assert not np.array_equal(whole, other_seed)
