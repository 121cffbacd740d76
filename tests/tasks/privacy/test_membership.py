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


pytestmark = pytest.mark.usefixtures("one_torch_thread")


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


def test_federated_model_under_local_statistics_gives_a_finite_membership_figure(tmp_path):
    from flwr.supercore.task_identity import TaskIdentity

    from schemas.federation import FederationConfig
    from tasks.federated import client_app as ca
    from tasks.federated.data import load_site_data, split_holdout, write_site_surrogates
    from tasks.federated.inprocess import run_in_process
    from tasks.federated.model import set_arrays
    from tasks.federated.training import recalibrate_batchnorm

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    stores = []
    for k in range(2):
        rng = np.random.default_rng(k)
        scans = []
        for s in range(4):
            labels = (rng.random(6) < 0.5).astype(np.uint8)
            images = rng.normal(size=(6, 16, 16)).astype(np.float32) + 2.0 * labels[:, None, None] * (1 + k)
            scans.append((f"scan-{s}", images, labels, np.zeros((6, 16, 16), np.uint8)))
        write_site_surrogates(tmp_path / f"S{k}.zarr", site_id=f"S{k}", scans=scans)
        stores.append(tmp_path / f"S{k}.zarr")
    cfg = FederationConfig(
        num_rounds=1,
        local_epochs=1,
        learning_rate=5e-3,
        batch_size=8,
        base_channels=4,
        min_available_clients=2,
        round_timeout_s=30,
        wait_for_nodes_s=2,
    )
    assert cfg.local_bn_statistics  # the default configuration
    grid, records = run_in_process(cfg, stores, tmp_path / "run")
    shared = {k: v.numpy() for k, v in torch.load(records[0].model_dir + "/model.pt").items()}
    li, lo = [], []
    for store, ctx in zip(stores, grid.contexts.values(), strict=True):
        train, hold = split_holdout(load_site_data(store, task="classify"), fraction=0.25, seed=0)
        model = build_model("classify", base_channels=4, seed=0)
        model.load_state_dict(ctx.state.array_records[ca._LOCAL_MODEL].to_torch_state_dict())
        set_arrays(model, shared)
        recalibrate_batchnorm(model, train.images, batch_size=8, device=CPU)
        li.append(slice_losses(model, train.images, train.targets, batch_size=8, device=CPU))
        lo.append(slice_losses(model, hold.images, hold.targets, batch_size=8, device=CPU))
    auc = loss_attack_auc(np.concatenate(li), np.concatenate(lo))
    assert np.isfinite(auc) and 0 <= auc <= 1
