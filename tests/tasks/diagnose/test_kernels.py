"""The diagnose kernel: batching never changes a slice's score; models of another task or size are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tasks.diagnose.kernels import check_model_fits, score_slices, slice_scores
from tasks.errors import InvalidInputError
from tasks.federated.model import build_model

CPU = torch.device("cpu")


@pytest.mark.parametrize("task", ["classify", "segment"])
def test_batched_scores_equal_per_slice_scores(task, rng):
    model = build_model(task, base_channels=4, seed=3)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so that eval-mode normalisation matters
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    slices = rng.normal(size=(7, 16, 16)).astype(np.float32)
    before = slices.copy()
    batched = score_slices(model, slices, batch_size=5, device=CPU)
    single = np.concatenate([score_slices(model, slices[k : k + 1], batch_size=1, device=CPU) for k in range(7)])
    np.testing.assert_allclose(batched, single, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(slices, before)  # input untouched
    assert batched.shape == ((7,) if task == "classify" else (7, 16, 16))
    assert np.all((batched > 0) & (batched < 1))
    assert np.ptp(slice_scores(batched)) > 0  # the slices are told apart


def test_slice_scores_take_the_largest_pixel():
    p = np.zeros((2, 4, 4), np.float32)
    p[1, 2, 3] = 0.9
    np.testing.assert_allclose(slice_scores(p), [0.0, 0.9], rtol=1e-6)
    np.testing.assert_allclose(slice_scores(np.array([0.2, 0.7], np.float32)), [0.2, 0.7], rtol=1e-6)


def test_a_model_of_another_task_or_size_is_refused_by_name():
    check_model_fits(version="abc", model_task="classify", model_size=(16, 16), slice_shape=(3, 16, 16))
    with pytest.raises(InvalidInputError, match=r"model abc was trained for task 'segment'.*'classify'"):
        check_model_fits(
            version="abc", model_task="segment", model_size=(16, 16), slice_shape=(3, 16, 16), expected_task="classify"
        )
    with pytest.raises(InvalidInputError, match=r"model abc was trained on 32x32 surrogates; these slices are 16x16"):
        check_model_fits(version="abc", model_task="classify", model_size=(32, 32), slice_shape=(3, 16, 16))


def test_bad_slices_are_refused():
    model = build_model("classify", base_channels=4, seed=0)
    with pytest.raises(InvalidInputError, match="must be"):
        score_slices(model, np.zeros((16, 16), np.float32), batch_size=2, device=CPU)
    assert score_slices(model, np.zeros((0, 16, 16), np.float32), batch_size=2, device=CPU).shape == (0,)
