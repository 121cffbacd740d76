"""Membership inference: both attacks find the members of an overfit model, and are near chance for a model that
never saw either set; refusals of diverged models and bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tasks.errors import InvalidInputError
from tasks.federated.model import build_model
from tasks.federated.training import train_local
from tasks.privacy.membership import ShadowAttack, attack_features, loss_attack_auc, slice_losses

CPU = torch.device("cpu")


def _data(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Noise slices with random labels: nothing to learn, so whatever a model fits is memorised."""
    return rng.normal(size=(n, 16, 16)).astype(np.float32), rng.integers(0, 2, n).astype(np.uint8)


def _overfit(x: np.ndarray, y: np.ndarray, seed: int) -> torch.nn.Module:
    model = build_model("classify", base_channels=4, seed=seed)
    train_local(
        model,
        x,
        y,
        task="classify",
        epochs=60,
        learning_rate=1e-2,
        batch_size=8,
        generator=torch.Generator().manual_seed(seed),
        device=CPU,
    )
    return model


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def test_both_attacks_find_the_members_of_an_overfit_model():
    rng = np.random.default_rng(0)
    members, others = _data(rng, 16), _data(rng, 16)
    target = _overfit(*members, seed=0)
    li = slice_losses(target, *members, batch_size=8, device=CPU)
    lo = slice_losses(target, *others, batch_size=8, device=CPU)
    assert loss_attack_auc(li, lo) > 0.75
    # a shadow model on other data of the same distribution teaches the attack model the threshold
    s_in, s_out = _data(rng, 16), _data(rng, 16)
    shadow = _overfit(*s_in, seed=1)
    attack = ShadowAttack.fit(
        attack_features(slice_losses(shadow, *s_in, batch_size=8, device=CPU), s_in[1]),
        attack_features(slice_losses(shadow, *s_out, batch_size=8, device=CPU), s_out[1]),
    )
    assert attack.auc(attack_features(li, members[1]), attack_features(lo, others[1])) > 0.75


def test_an_untrained_model_gives_no_membership_signal():
    rng = np.random.default_rng(1)
    a, b = _data(rng, 200), _data(rng, 200)
    model = build_model("classify", base_channels=4, seed=0)
    auc = loss_attack_auc(
        slice_losses(model, *a, batch_size=50, device=CPU), slice_losses(model, *b, batch_size=50, device=CPU)
    )
    assert 0.4 < auc < 0.6


def test_shadow_attack_learns_the_direction_and_a_diverged_model_is_refused():
    rng = np.random.default_rng(2)
    fin = attack_features(rng.exponential(0.1, 100), rng.integers(0, 2, 100))
    fout = attack_features(rng.exponential(1.0, 100), rng.integers(0, 2, 100))
    attack = ShadowAttack.fit(fin, fout)
    assert attack.weights[0] < 0  # lower loss: more likely a member
    assert attack.auc(fin, fout) > 0.8
    with pytest.raises(InvalidInputError, match="diverged"):
        loss_attack_auc([0.1, np.nan], [0.2])
    with pytest.raises(InvalidInputError, match="diverged"):
        attack.auc(attack_features([np.nan], [1]), fout)
    with pytest.raises(InvalidInputError, match="members"):
        loss_attack_auc([], [0.2])
    with pytest.raises(InvalidInputError, match="labels"):
        slice_losses(
            build_model("classify", base_channels=4, seed=0), np.zeros((3, 8, 8)), [0, 1], batch_size=2, device=CPU
        )
