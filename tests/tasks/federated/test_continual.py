"""Warm start from a saved model and local fine-tuning (tasks.federated.continual)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tasks.errors import InvalidInputError
from tasks.federated.continual import finetune_local, warm_start_model
from tasks.federated.model import build_model, shared_keys
from tasks.federated.training import auc_score, predict, recalibrate_batchnorm, train_local

from .conftest import synthetic_scans

CPU = torch.device("cpu")


def _data(seed: int, *, gain: float = 1.0, offset: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    scans = synthetic_scans(np.random.default_rng(seed), n_scans=2, n_slices=24, gain=gain, offset=offset)
    return np.concatenate([s[1] for s in scans]), np.concatenate([s[2] for s in scans])


def test_warm_start_carries_the_saved_weights_and_predicts_as_the_saved_model():
    x, y = _data(0)
    trained = build_model("classify", base_channels=4, seed=3)
    train_local(
        trained, x, y, task="classify", epochs=2, learning_rate=3e-3, batch_size=8,
        generator=torch.Generator().manual_seed(0), device=CPU,
    )  # fmt: skip
    warm = warm_start_model(trained.state_dict(), task="classify", base_channels=4, seed=99)
    fresh = build_model("classify", base_channels=4, seed=99)
    np.testing.assert_allclose(
        predict(warm, x, batch_size=16, device=CPU), predict(trained, x, batch_size=16, device=CPU)
    )
    assert not np.allclose(predict(fresh, x, batch_size=16, device=CPU), predict(trained, x, batch_size=16, device=CPU))


def test_warm_start_from_shared_entries_only_keeps_fresh_statistics():
    trained = build_model("classify", base_channels=4, seed=3)
    keys = shared_keys(trained, fedbn=False, local_statistics=True)
    state = {k: v + 0.5 for k, v in trained.state_dict().items() if k in keys}
    warm = warm_start_model(state, task="classify", base_channels=4)
    got = warm.state_dict()
    assert all(torch.equal(got[k], state[k]) for k in keys)
    assert torch.equal(got["features.0.1.running_var"], torch.ones_like(got["features.0.1.running_var"]))


def test_warm_start_refuses_another_task_width_or_a_diverged_state():
    unet = build_model("segment", base_channels=4, seed=0).state_dict()
    with pytest.raises(InvalidInputError, match="model has no entries"):
        warm_start_model(unet, task="classify", base_channels=4)
    wide = build_model("classify", base_channels=8, seed=0).state_dict()
    with pytest.raises(InvalidInputError, match=r"array 'features\.0\.0\.weight' has shape"):
        warm_start_model(wide, task="classify", base_channels=4)
    bad = {k: v.clone() for k, v in build_model("classify", base_channels=4, seed=0).state_dict().items()}
    bad["head.weight"][0, 0] = float("nan")
    with pytest.raises(InvalidInputError, match="'head.weight' holds NaN"):
        warm_start_model(bad, task="classify", base_channels=4)
    with pytest.raises(InvalidInputError, match="empty"):
        warm_start_model({}, task="classify", base_channels=4)


@pytest.mark.slow
def test_finetune_local_adapts_a_global_model_to_a_shifted_site():
    """A model trained on one site's slices, fine-tuned on another site's (another gain and offset, the lesion
    darker than the background: a reversed contrast), scores that site's new slices better than before."""
    x_a, y_a = _data(1)
    model = build_model("classify", base_channels=4, seed=0)
    train_local(
        model, x_a, y_a, task="classify", epochs=4, learning_rate=3e-3, batch_size=8,
        generator=torch.Generator().manual_seed(0), device=CPU,
    )  # fmt: skip
    x_b, y_b = _data(2, gain=-1.5)
    x_b_new, y_b_new = _data(3, gain=-1.5)
    before = auc_score(predict(model, x_b_new, batch_size=32, device=CPU), y_b_new)
    stats = finetune_local(
        model, x_b, y_b, task="classify", epochs=6, learning_rate=3e-3, batch_size=8,
        generator=torch.Generator().manual_seed(1), device=CPU,
    )  # fmt: skip
    after = auc_score(predict(model, x_b_new, batch_size=32, device=CPU), y_b_new)
    assert stats.steps > 0 and stats.num_examples == len(y_b)
    print(f"AUC before {before:.3f} after {after:.3f}")
    assert after > before + 0.1, (before, after)
    # the statistics were re-estimated on the site's slices after training: doing it again changes nothing
    again = copy.deepcopy(model)
    recalibrate_batchnorm(again, x_b, batch_size=8, device=CPU)
    for key in ("features.0.1.running_mean", "features.6.1.running_var"):
        torch.testing.assert_close(again.state_dict()[key], model.state_dict()[key])
