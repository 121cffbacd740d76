"""Gradient inversion: recovers a slice from the single-slice gradient of a tiny linear and a tiny conv model
(so it can fail), infers the label, and gives a finite figure on the diagnostic classifier."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tasks.errors import InvalidInputError
from tasks.federated.model import build_model
from tasks.privacy.inversion import image_quality, infer_binary_label, invert_gradient, slice_gradient

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def _blob(size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.uniform(size * 0.3, size * 0.7, 2)
    img = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (size / 6) ** 2)) + 0.3 * yy / size
    return img.astype(np.float32)


def _linear(size: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(size * size, 1))


@pytest.mark.parametrize("label", [0, 1])
def test_linear_model_gradient_gives_the_slice_back(label):
    rng = np.random.default_rng(label)
    img = _blob(8, rng)
    model = _linear(8)
    grads = slice_gradient(model, img, label, device=CPU)
    assert infer_binary_label(grads) == label
    rec = invert_gradient(model, grads, shape=(8, 8), iterations=300, tv_weight=0.0,
                          generator=torch.Generator().manual_seed(0), device=CPU)
    assert image_quality(img, rec)["psnr_db"] > 30
    # a different slice's gradient rebuilds that slice, not this one
    other = _blob(8, np.random.default_rng(10 + label))
    rec2 = invert_gradient(model, slice_gradient(model, other, label, device=CPU), shape=(8, 8), iterations=300,
                           tv_weight=0.0, generator=torch.Generator().manual_seed(0), device=CPU)
    assert image_quality(img, rec2)["psnr_db"] < image_quality(other, rec2)["psnr_db"] - 10


def test_tiny_conv_model_gradient_resembles_the_slice_better_than_a_random_guess():
    rng = np.random.default_rng(3)
    img = _blob(16, rng)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Sigmoid(), nn.Flatten(), nn.Linear(4 * 16 * 16, 1))
    grads = slice_gradient(model, img, 1, device=CPU)
    rec = invert_gradient(model, grads, shape=(16, 16), iterations=500, tv_weight=1e-3,
                          generator=torch.Generator().manual_seed(0), device=CPU)
    noise = np.random.default_rng(4).normal(size=(16, 16))
    assert image_quality(img, rec)["psnr_db"] > 20
    assert image_quality(img, rec)["psnr_db"] > image_quality(img, noise)["psnr_db"] + 10


def test_diagnostic_classifier_attack_reports_a_finite_figure():
    img = _blob(32, np.random.default_rng(5))
    model = build_model("classify", base_channels=4, seed=0)
    grads = slice_gradient(model, img, 1, device=CPU)
    rec = invert_gradient(model, grads, shape=(32, 32), iterations=20, generator=torch.Generator().manual_seed(0),
                          device=CPU)
    q = image_quality(img, rec)
    assert np.isfinite(q["psnr_db"]) and -1 <= q["ssim"] <= 1
    assert np.allclose([rec.mean(), rec.std()], [0, 1], atol=1e-3)
    for p in model.parameters():  # the attack works on a copy
        assert p.grad is None


def test_bad_inputs_are_refused():
    model = _linear(4)
    with pytest.raises(InvalidInputError, match="label"):
        slice_gradient(model, np.zeros((4, 4)), 2, device=CPU)
    with pytest.raises(InvalidInputError, match="image"):
        slice_gradient(model, np.zeros((1, 4, 4)), 0, device=CPU)
    with pytest.raises(InvalidInputError, match="match"):
        invert_gradient(model, [torch.zeros(3)], shape=(4, 4), generator=torch.Generator(), device=CPU)
    with pytest.raises(InvalidInputError, match="bias"):
        infer_binary_label([torch.zeros(3)])
