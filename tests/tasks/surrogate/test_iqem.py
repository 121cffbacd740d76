"""IQEM: training runs and its discriminator learns, seeded, checkpoints round-trip, batched inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from schemas.surrogate import IqemConfig
from tasks.errors import InvalidInputError
from tasks.surrogate.hosts import load_host
from tasks.surrogate.iqem import enhance, enhance_and_rehide, load_generator, train_iqem
from tasks.surrogate.kernels import hide, low_frequency_mask

CPU = torch.device("cpu")


def _site(n: int = 12, size: int = 24) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    private = np.stack(
        [
            0.5
            + 0.3
            * np.exp(-((yy - size / 2 - rng.normal(0, 2)) ** 2 + (xx - size / 2) ** 2) / (size * rng.uniform(1, 3)))
            for _ in range(n)
        ]
    ).astype(np.float32)
    host = np.ascontiguousarray(load_host("camera", (size, size)))
    return private, host, hide(private, host, alpha=0.2, beta=0.8)


CONFIG = IqemConfig(enabled=True, steps=30, batch_size=4, channels=8, learning_rate=2e-3, seed=3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    _, host, surrogates = _site()
    path = tmp_path_factory.mktemp("iqem") / "site-A" / "iqem.pt"
    return train_iqem(surrogates, host, config=CONFIG, device=CPU, checkpoint_path=path), path


def test_discriminator_loss_goes_down(trained):
    result, _ = trained
    d = np.array(result.losses["d"])
    assert len(d) == CONFIG.steps and np.isfinite(d).all()
    assert d[-10:].mean() < 0.8 * d[:5].mean()


def test_seeded_training_is_deterministic(trained):
    result, _ = trained
    _, host, surrogates = _site()
    short = CONFIG.model_copy(update={"steps": 6})
    again = train_iqem(surrogates, host, config=short, device=CPU)
    np.testing.assert_allclose(again.losses["d"], result.losses["d"][:6], rtol=1e-5)
    other = train_iqem(surrogates, host, config=short.model_copy(update={"seed": 4}), device=CPU)
    assert not np.allclose(other.losses["d"], again.losses["d"])


def test_checkpoint_round_trip(trained):
    result, path = trained
    loaded = load_generator(path, device=CPU)
    s = torch.from_numpy(_site()[2])
    np.testing.assert_allclose(enhance(s, loaded).numpy(), enhance(s, result.generator).numpy(), atol=1e-6)
    with pytest.raises(InvalidInputError, match="no IQEM checkpoint"):
        load_generator(path.parent / "missing.pt", device=CPU)


def test_batched_inference_and_second_pass(trained):
    result, _ = trained
    private, _, surrogates = _site()
    s, p = torch.from_numpy(surrogates), torch.from_numpy(private)
    np.testing.assert_allclose(
        enhance(s, result.generator, batch_size=5).numpy(),
        enhance(s, result.generator, batch_size=64).numpy(),
        atol=1e-5,
    )
    out = enhance_and_rehide(p, s, result.generator, alpha=0.2, beta=0.8)
    g = enhance(s, result.generator)
    assert not torch.allclose(g, s, atol=1e-4)  # the trained generator changed the surrogates
    # Second pass: inside the mask the first pass's amplitude (1 - β)|H| + β|X|, G's phase; outside, G(s).
    _, host, _ = _site()
    mask = low_frequency_mask(s.shape[-2:], alpha=0.2)
    fo, fg = np.fft.fft2(out.numpy()), np.fft.fft2(g.numpy())
    fh, fx = np.fft.fft2(host), np.fft.fft2(private)
    expected_amp = (1 - 0.8) * np.abs(fh) + 0.8 * np.abs(fx)
    scale = np.abs(fh).max()
    np.testing.assert_allclose(np.abs(fo)[:, mask], expected_amp[:, mask], atol=1e-4 * scale)
    np.testing.assert_allclose(fo[:, ~mask], fg[:, ~mask], atol=1e-4 * scale)
    strong = np.abs(fo) > 1e-3 * scale
    assert np.abs(np.angle(fo * np.conj(fg))[strong]).max() < 1e-3


def test_second_pass_with_an_identity_generator_returns_the_surrogate():
    # A fresh generator is the identity (last layer zero): the second pass must not change the private share.
    private, _, surrogates = _site()
    g = train_iqem(
        surrogates, _site()[1], config=CONFIG.model_copy(update={"steps": 1, "learning_rate": 1e-9}), device=CPU
    ).generator
    s, p = torch.from_numpy(surrogates), torch.from_numpy(private)
    np.testing.assert_allclose(enhance_and_rehide(p, s, g, alpha=0.2, beta=0.8).numpy(), surrogates, atol=2e-5)


def test_bad_training_input():
    _, host, surrogates = _site()
    with pytest.raises(InvalidInputError, match="differs"):
        train_iqem(surrogates, host[:20], config=CONFIG, device=CPU)
    bad = surrogates.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(InvalidInputError, match="NaN"):
        train_iqem(bad, host, config=CONFIG, device=CPU)


@pytest.mark.gpu
def test_training_and_inference_on_cuda(tmp_path):
    """Training on the GPU learns as on the CPU; a checkpoint moves between devices; inference and the second
    pass on the GPU equal the CPU's with the same generator."""
    cuda = torch.device("cuda")
    private, host, surrogates = _site()
    result = train_iqem(surrogates, host, config=CONFIG, device=cuda, checkpoint_path=tmp_path / "iqem.pt")
    assert next(result.generator.parameters()).device.type == "cuda"
    d = np.array(result.losses["d"])
    assert len(d) == CONFIG.steps and np.isfinite(d).all()
    assert d[-10:].mean() < 0.8 * d[:5].mean()
    on_cpu = load_generator(tmp_path / "iqem.pt", device=CPU)
    s, p = torch.from_numpy(surrogates), torch.from_numpy(private)
    g_gpu = enhance(s.to(cuda), result.generator)
    assert g_gpu.device.type == "cuda"
    np.testing.assert_allclose(g_gpu.cpu().numpy(), enhance(s, on_cpu).numpy(), atol=1e-4)
    out = enhance_and_rehide(p.to(cuda), s.to(cuda), result.generator, alpha=0.2, beta=0.8)
    assert out.device.type == "cuda"
    expected = enhance_and_rehide(p, s, on_cpu, alpha=0.2, beta=0.8)
    np.testing.assert_allclose(out.cpu().numpy(), expected.numpy(), atol=1e-4)
