"""Linkage: the matchers re-identify unprotected images, and report a figure on surrogates."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi

from tasks.errors import InvalidInputError
from tasks.privacy.linkage import (
    correlation_matrix,
    embedded_log_amplitude,
    fit_feature_map,
    mask_log_amplitude,
    top1_accuracy,
)
from tasks.surrogate.kernels import hide_reference, hide_variant


def _images(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return ndi.gaussian_filter(rng.random((n, size, size)), (0, 1.0, 1.0)).astype(np.float32)


def test_spectral_matcher_links_unprotected_images_and_chance_is_one_over_n():
    x = _images(40)
    scores = correlation_matrix(embedded_log_amplitude(x, alpha=0.2, beta=1.0), mask_log_amplitude(x, alpha=0.2))
    rng = np.random.default_rng(0)
    assert top1_accuracy(scores, n_candidates=10, rng=rng) == 1.0
    # a constant score ties every candidate: the expected top-1 is chance exactly
    assert top1_accuracy(np.zeros((40, 40)), n_candidates=10, rng=rng) == pytest.approx(0.1)


def test_paper_surrogates_are_linkable_and_heavy_amplitude_noise_is_not():
    x, host = _images(60), _images(1, seed=9)[0]
    cand = mask_log_amplitude(x, alpha=0.2)
    paper = hide_reference(x, host, alpha=0.2, beta=0.5)
    rng = np.random.default_rng(1)
    top_paper = top1_accuracy(
        correlation_matrix(embedded_log_amplitude(paper, alpha=0.2, beta=0.5, hosts=host), cand),
        n_candidates=10,
        rng=rng,
        trials=3,
    )
    noisy = hide_variant(
        x, host, alpha=0.2, beta=0.5, variant="amplitude_noise", noise=rng.standard_normal(x.shape), noise_sigma=8.0
    )
    top_noisy = top1_accuracy(
        correlation_matrix(embedded_log_amplitude(noisy, alpha=0.2, beta=0.5, hosts=host), cand),
        n_candidates=10,
        rng=rng,
        trials=3,
    )
    assert top_paper > 0.9  # the host's share is subtracted exactly: the private amplitude is a fingerprint
    assert np.isfinite(top_noisy) and top_noisy < 0.5


def test_learned_matcher_from_public_identity_pairs_links_unprotected_images():
    public, x = _images(200, seed=3), _images(30, seed=4)
    fmap = fit_feature_map(
        embedded_log_amplitude(public, alpha=0.2, beta=1.0),
        mask_log_amplitude(public, alpha=0.2),
        rng=np.random.default_rng(0),
    )
    scores = correlation_matrix(fmap(embedded_log_amplitude(x, alpha=0.2, beta=1.0)), mask_log_amplitude(x, alpha=0.2))
    assert top1_accuracy(scores, n_candidates=10, rng=np.random.default_rng(1)) > 0.9


def test_distractors_come_from_the_same_group_first():
    # scores that confuse a query only with its own group: top-1 drops when the group's slices are distractors
    groups = np.repeat(np.arange(4), 10)
    scores = np.where(groups[:, None] == groups[None], 1.0, 0.0)
    # (10 - 1) // 2 = 4 distractors of the same group tie with the true image: 1 / 5 for every query
    assert top1_accuracy(scores, n_candidates=10, rng=np.random.default_rng(0), groups=groups) == pytest.approx(0.2)
    assert top1_accuracy(scores, n_candidates=10, rng=np.random.default_rng(0), trials=5) > 0.25


@pytest.mark.parametrize(
    ("scores", "n"),
    [(np.zeros((3, 4)), 2), (np.zeros((5, 5)), 1), (np.zeros((5, 5)), 6)],
)
def test_bad_inputs_refused(scores, n):
    with pytest.raises(InvalidInputError):
        top1_accuracy(scores, n_candidates=n, rng=np.random.default_rng(0))
