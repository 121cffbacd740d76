"""The hiding kernel: identity at zero strength, host phase, β of the private amplitude, batching, bad input."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from tasks.errors import InvalidInputError
from tasks.surrogate import kernels
from tasks.surrogate.kernels import hide, hide_reference, low_frequency_half_width, low_frequency_mask, to_unit_range

SHAPES = [(16, 16), (17, 23), (15, 32), (9, 8)]


def _pair(shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[-2], : shape[-1]]
    # Smooth structure plus texture, so every frequency has energy.
    base = np.sin(xx / 3.0) + np.cos(yy / 2.0)
    images = (base + rng.random(shape)).astype(np.float32)
    host = (rng.random(shape[-2:]) + 0.5 * np.cos((xx + 2 * yy) / 4.0)).astype(np.float32)
    return images, host


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("alpha", "beta"), [(0.0, 0.7), (0.2, 0.0), (0.0, 0.0)])
def test_zero_strength_returns_the_host(shape, alpha, beta):
    images, host = _pair((3, *shape), 0)
    out = hide(images, host, alpha=alpha, beta=beta)
    assert out.shape == images.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, np.broadcast_to(host, images.shape), atol=1e-6)


def test_half_width_follows_fda_convention():
    assert low_frequency_half_width((64, 64), alpha=0.1) == 6
    assert low_frequency_half_width((512, 300), alpha=0.1) == 30
    mask = low_frequency_mask((16, 20), alpha=0.1)  # b = 1: |ky|, |kx| <= 1
    assert mask.sum() == 9 and mask[0, 0] and mask[-1, -1] and mask[1, 19] and not mask[2, 0]
    assert not low_frequency_mask((16, 20), alpha=0.0).any()
    assert low_frequency_mask((16, 16), alpha=0.5).all()  # every frequency of a square image
    assert low_frequency_mask((16, 20), alpha=0.5).sum() == 16 * 17


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("alpha", "beta"), [(0.1, 0.5), (0.25, 0.3), (0.5, 1.0), (0.04, 0.8)])
def test_spectrum_host_phase_and_beta_mix_inside_the_mask(shape, alpha, beta):
    images, host = _pair(shape, 1)
    out = hide(images, host, alpha=alpha, beta=beta)
    fs, fh, fx = np.fft.fft2(out), np.fft.fft2(host), np.fft.fft2(images)
    mask = low_frequency_mask(shape, alpha=alpha)
    # Amplitude: β of the private amplitude inside the mask, the host's outside.
    expected = np.where(mask, (1 - beta) * np.abs(fh) + beta * np.abs(fx), np.abs(fh))
    scale = np.abs(fh).max()
    np.testing.assert_allclose(np.abs(fs), expected, atol=1e-5 * scale)
    # Phase: the host's wherever the surrogate's amplitude is not negligible.
    strong = np.abs(fs) > 1e-3 * scale
    dphi = np.angle(fs[strong] * np.conj(fh[strong]))
    assert np.abs(dphi).max() < 1e-3


def test_surrogate_is_mostly_host():
    images, host = _pair((32, 32), 2)
    out = hide(images, host, alpha=0.1, beta=0.5)
    assert np.corrcoef(out.ravel(), host.ravel())[0, 1] > np.corrcoef(out.ravel(), images.ravel())[0, 1]


def test_batched_equals_per_image_and_per_slice_hosts():
    images, host = _pair((5, 17, 20), 3)
    hosts = np.stack([host * (1 + k) for k in range(5)])
    batched = hide(images, hosts, alpha=0.15, beta=0.6)
    single = np.stack([hide(images[k], hosts[k], alpha=0.15, beta=0.6) for k in range(5)])
    np.testing.assert_allclose(batched, single, atol=1e-6)
    shared = hide(images, host, alpha=0.15, beta=0.6)
    np.testing.assert_allclose(
        shared, hide(images, np.broadcast_to(host, images.shape).copy(), alpha=0.15, beta=0.6), atol=1e-6
    )


def test_torch_in_torch_out_and_inputs_untouched():
    images, host = _pair((2, 16, 16), 4)
    ti, th = torch.from_numpy(images.copy()), torch.from_numpy(host.copy())
    out = hide(ti, th, alpha=0.1, beta=0.5, device="cpu")
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), hide(images, host, alpha=0.1, beta=0.5), atol=1e-6)
    np.testing.assert_array_equal(ti.numpy(), images)
    np.testing.assert_array_equal(th.numpy(), host)


def test_deterministic():
    images, host = _pair((3, 24, 24), 5)
    a = hide(images, host, alpha=0.1, beta=0.5)
    b = hide(images, host, alpha=0.1, beta=0.5)
    np.testing.assert_array_equal(a, b)


def test_zero_amplitude_host_takes_phase_zero():
    images, _ = _pair((16, 16), 6)
    out = hide(images, np.zeros((16, 16), np.float32), alpha=0.5, beta=1.0)
    # Whole spectrum, zero host: the amplitude of the image with phase 0 (a real, even function).
    expected = np.real(np.fft.ifft2(np.abs(np.fft.fft2(images))))
    np.testing.assert_allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": -0.01, "beta": 0.5}, "alpha"),
        ({"alpha": 0.51, "beta": 0.5}, "alpha"),
        ({"alpha": float("nan"), "beta": 0.5}, "alpha"),
        ({"alpha": 0.1, "beta": 1.5}, "beta"),
        ({"alpha": 0.1, "beta": -0.1}, "beta"),
    ],
)
def test_bad_strengths_refused(kwargs, match):
    images, host = _pair((8, 8), 0)
    with pytest.raises(InvalidInputError, match=match):
        hide(images, host, **kwargs)


def test_bad_arrays_refused():
    images, host = _pair((2, 16, 16), 0)
    with pytest.raises(InvalidInputError, match=r"host size \(16, 12\)"):
        hide(images, host[:, :12], alpha=0.1, beta=0.5)
    with pytest.raises(InvalidInputError, match="one per slice"):
        hide(images, np.stack([host] * 3), alpha=0.1, beta=0.5)
    bad = images.copy()
    bad[1, 3, 4] = np.nan
    with pytest.raises(InvalidInputError, match="images contain NaN.*slice 1"):
        hide(bad, host, alpha=0.1, beta=0.5)
    with pytest.raises(InvalidInputError, match="images contain NaN.*slice 1"):
        hide(bad, host, alpha=0.0, beta=0.5)
    bad_host = host.copy()
    bad_host[0, 0] = np.inf
    with pytest.raises(InvalidInputError, match="hosts contain"):
        hide(images, bad_host, alpha=0.1, beta=0.5)
    with pytest.raises(InvalidInputError, match="shape"):
        hide(images[0, 0], host[0], alpha=0.1, beta=0.5)


def test_to_unit_range_hu_and_per_mm_agree():
    hu = np.array([-1000.0, 0.0, 1000.0, 40.0], dtype=np.float32)
    np.testing.assert_allclose(to_unit_range(hu, unit="hu"), [0.0, 0.5, 1.0, 0.52], atol=1e-6)
    mu = 0.0192 * (1 + hu / 1000.0)
    np.testing.assert_allclose(
        to_unit_range(mu, unit="per_mm", water_attenuation_per_mm=0.0192), to_unit_range(hu, unit="hu"), atol=1e-5
    )
    with pytest.raises(InvalidInputError, match="window_hu"):
        to_unit_range(hu, unit="hu", window_hu=(10.0, -10.0))


@pytest.mark.parametrize("shape", [*SHAPES, (64, 64), (33, 48)])
@pytest.mark.parametrize(("alpha", "beta"), [(0.1, 0.5), (0.04, 0.8), (0.25, 0.3), (0.45, 0.7), (0.5, 1.0)])
@pytest.mark.parametrize("method", ["fft", "matmul", "auto"])
def test_fast_paths_equal_the_full_spectrum_reference(shape, alpha, beta, method, monkeypatch):
    # Two slices per chunk, five slices: several chunks, a short last one, reused buffers.
    monkeypatch.setattr(kernels, "CHUNK_BYTES", 4 * shape[0] * shape[1] * 2)
    images, _ = _pair((5, *shape), 7)
    rng = np.random.default_rng(8)
    host = rng.random(shape).astype(np.float32)
    hosts = rng.random((5, *shape)).astype(np.float32)
    for h in (host, hosts):
        expected = hide_reference(images, h, alpha=alpha, beta=beta)
        out = hide(images, h, alpha=alpha, beta=beta, method=method)
        # float32 precision: FFT paths ~1e-7 relative, the matmul path sums up to W terms per product
        np.testing.assert_allclose(out, expected, atol=1e-5 * np.abs(expected).max())
        # Calling again reuses nothing stale (the shared-host buffer is rewritten every chunk).
        np.testing.assert_array_equal(hide(images, h, alpha=alpha, beta=beta, method=method), out)


def test_reference_matches_the_stated_spectrum():
    images, host = _pair((2, 12, 15), 9)
    out = hide_reference(images, host, alpha=0.2, beta=0.6)
    mask = low_frequency_mask((12, 15), alpha=0.2)
    fs, fh, fx = (np.fft.fft2(np.asarray(a, np.float64)) for a in (out, host, images))
    tol = 1e-10 * np.abs(fh).max()
    np.testing.assert_allclose(np.abs(fs)[:, mask], (0.4 * np.abs(fh) + 0.6 * np.abs(fx))[:, mask], atol=tol)
    np.testing.assert_allclose(fs[:, ~mask], np.broadcast_to(fh, fs.shape)[:, ~mask], atol=tol)


def test_unknown_method_refused() -> None:
    images, host = _pair((2, 8, 8), 0)
    with pytest.raises(InvalidInputError, match="method"):
        hide(images, host, alpha=0.1, beta=0.5, method="dft")  # type: ignore[call-overload]


def test_nan_in_a_later_chunk_names_its_slice(monkeypatch):
    monkeypatch.setattr(kernels, "CHUNK_BYTES", 4 * 16 * 16 * 2)
    images, host = _pair((5, 16, 16), 0)
    images[4, 2, 2] = np.nan
    with pytest.raises(InvalidInputError, match="slice 4"):
        hide(images, host, alpha=0.1, beta=0.5)


def test_finite_values_too_large_for_float32_spectra_are_refused_as_such():
    images, host = _pair((3, 16, 16), 0)
    images[1] = 3e37  # finite, but 256 of them sum past float32's range: the spectrum would be inf
    with pytest.raises(InvalidInputError, match="too large"):
        hide(images, host, alpha=0.1, beta=0.5)
    images[1, 3, 3] = np.inf  # a real inf is still named as such, with its slice
    with pytest.raises(InvalidInputError, match=r"NaN or infinite values \(first at slice 1\)"):
        hide(images, host, alpha=0.1, beta=0.5)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize(("alpha", "beta"), [(0.1, 0.5), (0.0, 0.5)])
def test_out_receives_the_surrogates_even_in_place(kind, alpha, beta, monkeypatch):
    monkeypatch.setattr(kernels, "CHUNK_BYTES", 4 * 24 * 20 * 2)  # five slices, chunks of two
    images, host = _pair((5, 24, 20), 3)
    expected = hide(images, host, alpha=alpha, beta=beta)
    buffer = images.copy() if kind == "numpy" else torch.from_numpy(images.copy())
    got = hide(buffer, host, alpha=alpha, beta=beta, out=buffer)  # in place: each chunk is read before written
    assert got is buffer
    np.testing.assert_array_equal(np.asarray(buffer), expected)
    fresh = np.full_like(images, np.nan)
    assert hide(images, host, alpha=alpha, beta=beta, out=fresh) is fresh
    np.testing.assert_array_equal(fresh, expected)


def test_out_that_cannot_hold_the_surrogates_is_refused():
    images, host = _pair((3, 16, 16), 0)
    for bad in (
        np.zeros((3, 16, 15), np.float32),
        np.zeros((3, 16, 16), np.float64),
        np.zeros((3, 16, 32), np.float32)[..., ::2],
    ):
        with pytest.raises(InvalidInputError, match="out must be C-contiguous float32 of shape"):
            hide(images, host, alpha=0.1, beta=0.5, out=bad)
    frozen = np.zeros_like(images)
    frozen.flags.writeable = False
    with pytest.raises(InvalidInputError, match="writeable"):
        hide(images, host, alpha=0.1, beta=0.5, out=frozen)


def test_one_shared_host_is_prepared_once_per_thread_and_never_reused_stale(monkeypatch):
    monkeypatch.setattr(kernels, "CHUNK_BYTES", 4 * 24 * 20 * 2)  # chunks of two slices
    monkeypatch.setattr(kernels, "_SHARED_HOST", kernels._SharedHostCache())
    made = []

    class CountingHosts(kernels._Hosts):
        def __init__(self, *args, **kwargs):
            made.append(threading.get_ident())
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(kernels, "_Hosts", CountingHosts)
    images, host = _pair((5, 24, 20), 4)

    def check(x, h, beta=0.5):
        got = hide(x, h, alpha=0.2, beta=beta)
        np.testing.assert_allclose(got, hide_reference(x, h, alpha=0.2, beta=beta), atol=1e-5)

    check(images, host)
    check(images[::-1].copy(), host)  # same host, other slices: prepared once
    check(images[:1], host)  # fewer slices than the buffers hold: still the same
    assert len(made) == 1
    host[3, 4] += 0.5  # changed in place (the kernel sees this memory through torch.from_numpy)
    check(images, host)
    check(images, host, beta=0.8)
    assert len(made) == 3
    check(images[:1], host, beta=0.8)
    assert len(made) == 3

    # Every thread has its own prepared host: its synthesis buffers are written by every chunk.
    seeds = range(6)
    expected = {s: hide_reference(_pair((5, 24, 20), s)[0], host, alpha=0.2, beta=0.8) for s in seeds}

    def worker(seed):
        x = _pair((5, 24, 20), seed)[0]
        return [hide(x, host, alpha=0.2, beta=0.8) for _ in range(10)]

    with ThreadPoolExecutor(3) as pool:
        results = dict(zip(seeds, pool.map(worker, seeds), strict=True))
    for s, outs in results.items():
        for got in outs:
            np.testing.assert_allclose(got, expected[s], atol=1e-5)
    in_pool = made[3:]
    assert in_pool and len(set(in_pool)) == len(in_pool)  # once in each pool thread that ran a seed


@pytest.mark.parametrize("host_kind", ["shared", "per slice"])
@pytest.mark.parametrize("in_place", [False, True])
def test_several_groups_of_chunks_equal_the_reference(host_kind, in_place, monkeypatch):
    # Chunks of two slices, groups of two chunks, eleven slices: groups of 4, 4 and 3, a short last chunk in each.
    monkeypatch.setattr(kernels, "CHUNK_BYTES", 4 * 20 * 18 * 2)
    monkeypatch.setattr(kernels, "GROUP_CHUNKS", 2)
    monkeypatch.setattr(kernels, "_SHARED_HOST", kernels._SharedHostCache())
    images, host = _pair((11, 20, 18), 5)
    hosts = host if host_kind == "shared" else np.random.default_rng(6).random((11, 20, 18)).astype(np.float32)
    expected = hide_reference(images, hosts, alpha=0.2, beta=0.6)
    buffer = images.copy()
    got = hide(buffer, hosts, alpha=0.2, beta=0.6, method="fft", out=buffer if in_place else None)
    np.testing.assert_allclose(got, expected, atol=1e-5 * np.abs(expected).max())
    if in_place:
        assert got is buffer
    else:
        np.testing.assert_array_equal(buffer, images)  # the input is not touched


@pytest.mark.parametrize("shape", [(20, 18), (20, 19), (18, 20), (40, 41), (100, 100)])
def test_mask_keeps_every_bin_up_to_the_half_width(shape):
    # Integer frequencies: with fftfreq(n) * n, 3 / 20 * 20 rounds above 3 and the mask lost rows ±3 at n = 20.
    for alpha in (0.1, 0.2, 0.3, 0.45):
        b = low_frequency_half_width(shape, alpha=alpha)
        mask = low_frequency_mask(shape, alpha=alpha)
        ky = np.abs((np.arange(shape[0]) + shape[0] // 2) % shape[0] - shape[0] // 2)
        kx = np.abs((np.arange(shape[1]) + shape[1] // 2) % shape[1] - shape[1] // 2)
        np.testing.assert_array_equal(mask, (ky[:, None] <= b) & (kx[None, :] <= b))
        assert mask.sum() == min(2 * b + 1, shape[0]) * min(2 * b + 1, shape[1])


@pytest.mark.parametrize("method", ["fft", "matmul"])
def test_a_reused_host_does_not_depend_on_the_memory_it_was_first_passed_in(method, monkeypatch):
    monkeypatch.setattr(kernels, "_SHARED_HOST", kernels._SharedHostCache())
    images, host = _pair((3, 24, 20), 7)
    expected = hide_reference(images, host, alpha=0.05, beta=0.5)
    buffer = host.copy()
    hide(images, buffer, alpha=0.05, beta=0.5, method=method)
    buffer[:] = 0.0  # the caller reuses its buffer for something else ...
    got = hide(images, host.copy(), alpha=0.05, beta=0.5, method=method)  # ... and passes the same host anew
    np.testing.assert_allclose(got, expected, atol=1e-5 * np.abs(expected).max())


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["fft", "matmul"])
@pytest.mark.parametrize("host_kind", ["shared", "per slice"])
def test_cuda_equals_the_reference_and_stays_on_the_device(method, host_kind, monkeypatch):
    # Several chunks and groups (as on the CPU), both host policies, tensors in and out, out= on the device too.
    monkeypatch.setattr(kernels, "CHUNK_BYTES", 4 * 20 * 18 * 2)
    monkeypatch.setattr(kernels, "GROUP_CHUNKS", 2)
    images, host = _pair((11, 20, 18), 5)
    hosts = host if host_kind == "shared" else np.random.default_rng(6).random((11, 20, 18)).astype(np.float32)
    expected = hide_reference(images, hosts, alpha=0.2, beta=0.6)
    x, h = torch.from_numpy(images).cuda(), torch.from_numpy(hosts).cuda()
    got = hide(x, h, alpha=0.2, beta=0.6, method=method)
    assert got.device.type == "cuda"
    np.testing.assert_allclose(got.cpu().numpy(), expected, atol=1e-5 * np.abs(expected).max())
    out = torch.empty_like(x)
    assert hide(x, h, alpha=0.2, beta=0.6, method=method, out=out) is out
    np.testing.assert_allclose(out.cpu().numpy(), expected, atol=1e-5 * np.abs(expected).max())
    # numpy in, computed on the GPU, numpy out
    cpu_in = hide(images, hosts, alpha=0.2, beta=0.6, method=method, device="cuda")
    assert isinstance(cpu_in, np.ndarray)
    np.testing.assert_allclose(cpu_in, expected, atol=1e-5 * np.abs(expected).max())
    bad = x.clone()
    bad[7, 3, 4] = float("nan")
    with pytest.raises(InvalidInputError, match="slice 7"):
        hide(bad, h, alpha=0.2, beta=0.6, method=method)
