"""The diagnose kernel: batching never changes a slice's score; models of another task or size are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tasks.diagnose.kernels as kernels
from tasks.diagnose.kernels import PairMaxPool, check_model_fits, inference_model, score_slices, slice_scores
from tasks.errors import InvalidInputError
from tasks.federated.model import build_model
from tasks.federated.training import predict

CPU = torch.device("cpu")


def _trained_looking(task: str, seed: int = 3) -> torch.nn.Module:
    """A model with non-trivial BatchNorm statistics and affine parameters, so that folding them matters."""
    model = build_model(task, base_channels=4, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(0.5 + 1.5 * torch.rand(m.num_features, generator=g))
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("task", ["classify", "segment"])
def test_batched_scores_equal_per_slice_scores(task, fast, rng, monkeypatch):
    model = _trained_looking(task)
    if fast:
        model = inference_model(model)
        monkeypatch.setattr(kernels, "PIXELS_PER_PASS", 2 * 16 * 16)  # passes of 2 slices, whatever batch_size
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


@pytest.mark.parametrize(
    ("task", "shape"), [("classify", (5, 40, 36)), ("classify", (3, 19, 23)), ("segment", (4, 24, 20))]
)
def test_the_inference_model_scores_as_the_training_model_predicts(task, shape, rng):
    model = _trained_looking(task, seed=7)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = inference_model(model)
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.MaxPool2d)) for m in fast.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the original is untouched
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    slices = (3.0 + 2.0 * rng.normal(size=shape)).astype(np.float32)
    reference = predict(model, slices, batch_size=2, device=CPU)  # the unoptimised path: autograd, NCHW, BatchNorm
    scored = score_slices(fast, slices, batch_size=4, device=CPU)
    assert scored.shape == reference.shape and scored.dtype == np.float32
    np.testing.assert_allclose(scored, reference, rtol=0, atol=1e-5)
    assert np.ptp(slice_scores(reference)) > 1e-4  # the comparison is not between constants
    x = torch.from_numpy(slices[:, None])
    with torch.no_grad():  # the logits too, before the sigmoid flattens differences
        torch.testing.assert_close(fast(x), model.eval()(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (1, 4, 9, 7), (2, 1, 5, 6)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_pair_max_pool_is_max_pool(shape, channels_last):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(PairMaxPool()(x), torch.nn.MaxPool2d(2)(x))
