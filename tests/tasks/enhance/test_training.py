"""Local training: deterministic under an injected generator, learns on pairs it can learn from, refuses a NaN or
infinite loss by name; pairs for both targets come from a scan's own projections."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from schemas.geometry import Geometry, ReconGrid
from tasks.enhance.model import Architecture, build_model
from tasks.enhance.training import TrainSettings, build_pairs, train_enhance
from tasks.errors import InvalidInputError, TrainingDivergedError
from tasks.reconstruct.kernels import forward_project

CPU = torch.device("cpu")
ARCH = Architecture(channels=4, depth=1)
WATER = 0.02


def _phantoms(n: int = 6, size: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    out = []
    for _ in range(n):
        r = rng.uniform(6, 12)
        cy, cx = rng.uniform(-3, 3, 2)
        out.append(np.where(np.hypot(yy - cy, xx - cx) < r, rng.uniform(-100, 100), -1000.0))
    return np.asarray(out, dtype=np.float32)


def _train(seed: int, clean: np.ndarray, noisy: np.ndarray, steps: int = 20) -> dict[str, torch.Tensor]:
    model = build_model(ARCH, generator=torch.Generator().manual_seed(0))
    settings = TrainSettings(steps=steps, batch_size=3, learning_rate=3e-3)
    return train_enhance(
        model, noisy, clean, settings=settings, generator=torch.Generator().manual_seed(seed), device=CPU
    ).state_dict


def test_same_generator_same_weights_other_generator_differs() -> None:
    clean = _phantoms()
    noisy = clean + np.random.default_rng(1).normal(0, 80, clean.shape).astype(np.float32)
    a, b, c = _train(5, clean, noisy), _train(5, clean, noisy), _train(6, clean, noisy)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert not all(torch.allclose(a[k], c[k], atol=1e-6) for k in a)


def test_training_lowers_the_loss_on_learnable_pairs() -> None:
    clean = _phantoms(8)
    noisy = clean + np.random.default_rng(1).normal(0, 100, clean.shape).astype(np.float32)
    model = build_model(ARCH, generator=torch.Generator().manual_seed(0))
    before = float(np.mean((noisy - clean) ** 2))
    result = train_enhance(
        model,
        noisy,
        clean,
        settings=TrainSettings(steps=120, batch_size=4, learning_rate=3e-3),
        generator=torch.Generator().manual_seed(0),
        device=CPU,
    )
    assert result.metrics["steps"] == 120 and result.metrics["examples"] == 8
    assert result.metrics["loss_last"] < 0.7 * result.metrics["loss_first"]
    with torch.no_grad():
        after = float(torch.mean((model.eval()(torch.as_tensor(noisy)) - torch.as_tensor(clean)) ** 2))
    assert after < 0.7 * before


def test_an_infinite_loss_is_refused_naming_the_step() -> None:
    x = _phantoms(2)
    y = np.full_like(x, 3e38)  # finite, but its squared error is not
    model = build_model(ARCH)
    with pytest.raises(TrainingDivergedError, match="loss is inf at step 0"):
        train_enhance(model, x, y, settings=TrainSettings(steps=3), generator=torch.Generator(), device=CPU)


def test_a_diverging_learning_rate_is_refused() -> None:
    x = _phantoms(4)
    model = build_model(ARCH, generator=torch.Generator().manual_seed(0))
    with pytest.raises(TrainingDivergedError, match="loss is (nan|inf)|non-finite weights"):
        train_enhance(
            model,
            x,
            x + 50.0,
            settings=TrainSettings(steps=50, batch_size=2, learning_rate=1e30),
            generator=torch.Generator().manual_seed(0),
            device=CPU,
        )


def test_nan_pairs_and_mismatched_shapes_are_refused() -> None:
    x = _phantoms(2)
    model = build_model(ARCH)
    with pytest.raises(InvalidInputError, match="must be the same"):
        train_enhance(model, x, x[:1], settings=TrainSettings(), generator=torch.Generator(), device=CPU)
    y = x.copy()
    y[0, 0, 0] = np.nan
    with pytest.raises(InvalidInputError, match="NaN"):
        train_enhance(model, x, y, settings=TrainSettings(), generator=torch.Generator(), device=CPU)


def test_build_pairs_for_both_targets() -> None:
    grid = ReconGrid(nx_pixels=32, ny_pixels=32, pixel_size_mm=1.0)
    g = Geometry(beam="parallel", n_views=32, n_detector_cols=48, detector_pitch_mm=1.0, n_detector_rows=2, grid=grid)
    mu = (_phantoms(2) / 1000.0 * WATER + WATER).clip(0)
    lines = np.asarray(forward_project(mu, g, device=CPU))  # (rows, views, cols)
    i0 = 1e4
    counts = np.random.default_rng(0).poisson(i0 * np.exp(-lines)).astype(np.float32).transpose(1, 0, 2)
    projections = np.log(i0 / np.maximum(counts, 0.5)).astype(np.float32)
    x, y = build_pairs(projections, g, target="noise2inverse", water_attenuation_per_mm=WATER, device=CPU)
    assert x.shape == y.shape == (4, 32, 32)  # k = 2 splits x 2 slices
    x, y = build_pairs(
        projections,
        g,
        target="thinning",
        water_attenuation_per_mm=WATER,
        device=CPU,
        counts=counts,
        i0_photons=i0,
        rng=np.random.default_rng(1),
    )
    assert x.shape == y.shape == (2, 32, 32)
    inside = np.hypot(*(np.mgrid[:32, :32] - 15.5)) < 10
    truth_hu = (mu - WATER) / WATER * 1000
    # both halves image the same object: their means agree with the truth's to within the noise
    for img in (x, y):
        assert abs(float(img[:, inside].mean() - truth_hu[:, inside].mean())) < 40
    with pytest.raises(InvalidInputError, match="needs counts, i0_photons"):
        build_pairs(projections, g, target="thinning", water_attenuation_per_mm=WATER, device=CPU)


def test_a_proximal_term_keeps_the_weights_near_their_start() -> None:
    clean = _phantoms(4)
    noisy = clean + np.random.default_rng(1).normal(0, 100, clean.shape).astype(np.float32)
    start = build_model(ARCH, generator=torch.Generator().manual_seed(0)).state_dict()

    def drift(mu: float) -> float:
        model = build_model(ARCH, generator=torch.Generator().manual_seed(0))
        settings = TrainSettings(steps=15, batch_size=2, learning_rate=3e-3, proximal_mu=mu)
        state = train_enhance(
            model, noisy, clean, settings=settings, generator=torch.Generator().manual_seed(0), device=CPU
        ).state_dict
        return sum(float(torch.sum((state[k] - start[k]) ** 2)) for k in start)

    assert drift(1e4) < 0.5 * drift(0.0)  # FedProx: a strong pull towards the global weights
