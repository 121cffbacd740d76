"""The host-domain discriminator tells different image kinds apart, and not two halves of one kind."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi

from tasks.errors import InvalidInputError
from tasks.privacy.discriminator import discriminator_aucs
from tasks.surrogate.evaluation import TrainSettings
from tasks.surrogate.kernels import hide_reference

SETTINGS = TrainSettings(steps=60, batch_size=16, learning_rate=3e-3)


def _smooth(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return ndi.gaussian_filter(rng.random((n, 16, 16)), (0, 2.0, 2.0)).astype(np.float32)


def _texture(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 16, 16)).astype(np.float32)


def test_different_kinds_are_told_apart():
    aucs = discriminator_aucs(_smooth(40, 0), _texture(40, 1), seeds=[0], settings=SETTINGS)
    assert aucs[0] > 0.9


def test_one_kind_against_itself_is_near_chance_and_surrogates_give_a_finite_auc():
    same = discriminator_aucs(_smooth(40, 0), _smooth(40, 1), seeds=[0, 1], settings=SETTINGS)
    assert abs(float(np.mean(same)) - 0.5) < 0.25
    domain = _texture(60, 2)
    surr = hide_reference(_smooth(40, 3), domain[:40], alpha=0.2, beta=0.5).astype(np.float32)
    auc = discriminator_aucs(surr, domain[40:], seeds=[0], settings=SETTINGS)[0]
    assert 0.0 <= auc <= 1.0


def test_bad_inputs_refused():
    with pytest.raises(InvalidInputError):
        discriminator_aucs(_smooth(1, 0), _smooth(4, 1), seeds=[0], settings=SETTINGS)
    with pytest.raises(InvalidInputError):
        discriminator_aucs(_smooth(4, 0), np.zeros((4, 8, 8)), seeds=[0], settings=SETTINGS)
    with pytest.raises(InvalidInputError):
        discriminator_aucs(_smooth(4, 0), _smooth(4, 1), seeds=[], settings=SETTINGS)
