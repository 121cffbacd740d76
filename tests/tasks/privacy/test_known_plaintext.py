"""Known plaintext: the ridge inverse recovers unprotected images, and reports a figure on surrogates."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi

from tasks.errors import InvalidInputError
from tasks.privacy.known_plaintext import known_plaintext_attack, known_plaintext_network_attack
from tasks.surrogate.evaluation import TrainSettings, image_metrics
from tasks.surrogate.kernels import hide_reference


def _images(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return ndi.gaussian_filter(rng.random((n, size, size)), (0, 1.0, 1.0)).astype(np.float32)


def test_unprotected_images_are_recovered_from_public_identity_pairs():
    public, site = _images(400, seed=1), _images(20, seed=2)
    rec = known_plaintext_attack(None, site, alpha=0.2, beta=1.0, rng=np.random.default_rng(0), public=(public, public))
    psnr, ssim = image_metrics(site, rec["public"])
    assert psnr > 35 and ssim > 0.95


def test_surrogates_report_every_strategy_and_lose_to_the_unprotected_attack():
    public, site, host = _images(400, seed=1), _images(40, seed=2), _images(1, seed=3)[0]
    surr = hide_reference(site, host, alpha=0.2, beta=0.5).astype(np.float32)
    pub_s = hide_reference(public, host, alpha=0.2, beta=0.5).astype(np.float32)
    rec = known_plaintext_attack(
        (surr[:10], site[:10]),
        surr[10:],
        alpha=0.2,
        beta=0.5,
        rng=np.random.default_rng(0),
        public=(pub_s, public),
        pair_hosts=host,
        hosts=host,
        public_hosts=host,
    )
    assert set(rec) == {"pairs", "public", "public+pairs"}
    psnrs = {k: image_metrics(site[10:], v)[0] for k, v in rec.items()}
    assert all(np.isfinite(v) for v in psnrs.values())
    assert max(psnrs.values()) < 30  # the host's phase hides the private one: far below the unprotected > 35 dB


def test_one_known_pair_of_an_identity_transform_is_not_the_whole_key():
    # with pairs alone (no public data) the inverse is learnt from k images only: more pairs, better inversion
    site = _images(60, seed=2)
    rng = np.random.default_rng(0)
    few = known_plaintext_attack((site[:2], site[:2]), site[40:], alpha=0.2, beta=1.0, rng=rng)["pairs"]
    many = known_plaintext_attack((site[:40], site[:40]), site[40:], alpha=0.2, beta=1.0, rng=rng)["pairs"]
    assert image_metrics(site[40:], many)[0] > image_metrics(site[40:], few)[0] + 3


def test_refuses_no_data_and_mismatched_pairs():
    x = _images(4)
    with pytest.raises(InvalidInputError, match="neither"):
        known_plaintext_attack(None, x, alpha=0.2, beta=0.5, rng=np.random.default_rng(0))
    with pytest.raises(InvalidInputError, match="pairs"):
        known_plaintext_attack((x, x[:2]), x, alpha=0.2, beta=0.5, rng=np.random.default_rng(0))


def test_network_attacker_learns_an_unprotected_identity_and_reports_on_surrogates():
    public, site, host = _images(64, seed=1), _images(16, seed=2), _images(1, seed=3)[0]
    settings = TrainSettings(steps=60, batch_size=8, learning_rate=2e-3)
    rec = known_plaintext_network_attack((site[:4], site[:4]), site[4:], public=(public, public), settings=settings)
    # the U-Net is residual (x + f(x)): an identity is learnt at once, far above a blank guess
    assert image_metrics(site[4:], rec)[0] > 35
    surr = hide_reference(site, host, alpha=0.2, beta=0.5).astype(np.float32)
    pub_s = hide_reference(public, host, alpha=0.2, beta=0.5).astype(np.float32)
    rec_s = known_plaintext_network_attack((surr[:4], site[:4]), surr[4:], public=(pub_s, public), settings=settings)
    assert np.isfinite(image_metrics(site[4:], rec_s)[0])
