"""Kernel tests: identity on exact low rank, the expected noise reduction, quality on a phantom, bad inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.data import shepp_logan_phantom
from skimage.transform import iradon, radon, resize

from schemas.denoise import DenoiseConfig, DenoiseDomain, ThresholdMode, ViewBoundary
from schemas.geometry import Geometry
from tasks.denoise.kernels import (
    denoise_projections,
    denoise_view_window,
    estimate_noise_sigma,
    estimate_noise_sigma_of,
    noise_sample_views,
    pad_views,
    resolve_periodic,
)
from tasks.errors import DeviceUnavailableError, InvalidInputError

BEST = DenoiseConfig(domain=DenoiseDomain.LOG)  # the default layout, in the log domain (no I0 needed)


def rank1_scan(
    rng: np.random.Generator, views: int = 48, rows: int = 2, cols: int = 40, period_views: float = 5.0
) -> np.ndarray:
    """Exactly rank 1 along views in every block: a fixed detector profile scaled per view."""
    profile = (0.5 + rng.random((1, rows, cols))).astype(np.float32)
    scale = (1.0 + 0.3 * np.sin(np.arange(views) / period_views)).astype(np.float32)
    return (scale[:, None, None] * profile).astype(np.float32)


@pytest.mark.parametrize(
    "config",
    [
        DenoiseConfig.paper(),
        DenoiseConfig.paper(views_per_group=16),
        BEST,
        BEST.model_copy(update={"second_pass": False}),
        BEST.model_copy(update={"threshold_mode": ThresholdMode.AUTO_HARD}),
        BEST.model_copy(update={"tile_rows": None, "tile_cols": None, "tile_stride_cols": None}),
    ],
    ids=["paper8", "paper16", "best-log", "one-pass", "auto-hard", "whole-view"],
)
@pytest.mark.parametrize("periodic", [False, True])
def test_identity_on_noise_free_rank1(config: DenoiseConfig, periodic: bool, rng: np.random.Generator) -> None:
    x = rank1_scan(rng)
    before = x.copy()
    y = denoise_projections(x, config=config, periodic=periodic)
    np.testing.assert_array_equal(x, before)  # input untouched
    assert y.dtype == np.float32 and y.shape == x.shape
    # float32 centred blocks and the σ the data show (signal leaks into it): within 3e-5 of values ~1
    np.testing.assert_allclose(y, x, rtol=0, atol=5e-5)


def test_identity_in_anscombe_domain(rng: np.random.Generator) -> None:
    x = rank1_scan(rng) + 1.0
    y = denoise_projections(x, config=DenoiseConfig(second_pass=False), periodic=False, i0_photons=1e5, noise_sigma=0.0)
    # the unbiased inverse differs from the algebraic one by O(1/counts): 1e5·e^-2.5 ≈ 8e3 counts
    np.testing.assert_allclose(y, x, atol=5e-4)


@pytest.mark.parametrize("t", [8, 16])
def test_rank1_keeps_one_over_t_of_white_noise(t: int, rng: np.random.Generator) -> None:
    """Paper mode on a strong rank-1 signal plus white noise keeps ≈ 1/t + 1/M of the noise variance."""
    views, cols = 32 * t, 256
    signal = rank1_scan(rng, views=views, rows=1, cols=cols)
    noise = (0.05 * rng.standard_normal(signal.shape)).astype(np.float32)
    y = denoise_projections(signal + noise, config=DenoiseConfig.paper(views_per_group=t), periodic=True)
    kept = float(np.var(y - signal) / np.var(noise))
    expected = 1 / t + 1 / cols - 1 / (t * cols)
    assert kept == pytest.approx(expected, rel=0.1)


def test_auto_threshold_removes_nearly_all_pure_noise(rng: np.random.Generator) -> None:
    """Zero signal: the centred block's singular values all lie in the noise bulk and are zeroed; only each
    group's mean view is kept (1/t of the variance), and overlapping groups average that down further."""
    noise = (0.1 * rng.standard_normal((256, 1, 128))).astype(np.float32)
    config = BEST.model_copy(update={"second_pass": False})
    y = denoise_projections(noise, config=config, periodic=True)
    assert float(np.var(y) / np.var(noise)) < 1.0 / config.group_size


def test_noise_sigma_estimate_matches_the_truth(rng: np.random.Generator) -> None:
    x = rank1_scan(rng, views=300, rows=4, cols=64, period_views=100.0)
    noisy = x + (0.03 * rng.standard_normal(x.shape)).astype(np.float32)
    assert estimate_noise_sigma_of(noisy, config=BEST, i0_photons=None) == pytest.approx(0.03, rel=0.05)


def test_anscombe_noise_sigma_is_one_for_poisson_data(rng: np.random.Generator) -> None:
    i0 = 2e4
    p = rank1_scan(rng, views=300, rows=2, cols=64, period_views=100.0)
    counts = np.maximum(rng.poisson(i0 * np.exp(-p.astype(np.float64))), 0.5)
    noisy = np.log(i0 / counts).astype(np.float32)
    sigma = estimate_noise_sigma_of(noisy, config=DenoiseConfig(), i0_photons=i0)
    assert sigma == pytest.approx(1.0, rel=0.05)


def test_noise_sample_views_are_evenly_spaced_triplets() -> None:
    idx = noise_sample_views(100, n_triplets=10)
    assert idx.shape == (10, 3)
    assert idx.min() == 0 and idx.max() <= 99
    np.testing.assert_array_equal(np.diff(idx, axis=1), 1)
    assert noise_sample_views(7, n_triplets=64).shape == (2, 3)


THETA = np.linspace(0.0, 360.0, 720, endpoint=False)


def _phantom_sinogram(rng: np.random.Generator, i0: float) -> tuple[np.ndarray, np.ndarray]:
    image = resize(shepp_logan_phantom(), (64, 64), anti_aliasing=True).astype(np.float32) * 0.1
    clean = radon(image, theta=THETA, circle=True).T.astype(np.float32)  # (views, cols), pixel units
    counts = np.maximum(rng.poisson(i0 * np.exp(-clean.astype(np.float64))), 0.5)
    noisy = np.log(i0 / counts).astype(np.float32)
    return clean, noisy


def _fbp(sino: np.ndarray) -> np.ndarray:
    return iradon(sino.T, theta=THETA, circle=True, filter_name="ramp")


@pytest.mark.parametrize(
    ("config", "needs_i0", "min_gain_db"),
    [(DenoiseConfig.paper(), False, 0.5), (BEST, False, 2.0), (DenoiseConfig(), True, 2.0)],
    ids=["paper", "best-log", "best-anscombe"],
)
def test_quality_rises_on_a_phantom(
    config: DenoiseConfig, needs_i0: bool, min_gain_db: float, rng: np.random.Generator
) -> None:
    """Sinogram error falls and the FBP moves towards the FBP of the noise-free sinogram (PSNR up)."""
    i0 = 1e3
    clean, noisy = _phantom_sinogram(rng, i0)
    den = denoise_projections(noisy[:, None, :], config=config, periodic=True, i0_photons=i0 if needs_i0 else None)
    den = den[:, 0, :]
    assert np.mean((den - clean) ** 2) < 0.4 * np.mean((noisy - clean) ** 2)
    reference = _fbp(clean)

    def psnr(sino: np.ndarray) -> float:
        return 10 * math.log10(float(reference.max()) ** 2 / float(np.mean((_fbp(sino) - reference) ** 2)))

    assert psnr(den) > psnr(noisy) + min_gain_db


def _svd_blocks_reference(x: np.ndarray, *, t: int, tr: int, tc: int, keep: float, periodic: bool) -> np.ndarray:
    """Non-overlapping blocks anchored at view, row and column 0, each rebuilt from numpy's SVD (float64) with the
    singular values at least ``keep`` times the largest; views past the end wrapped or mirrored, rows and
    columns past the detector mirrored."""
    views, rows, cols = x.shape
    nv, nr, nc = -(-views // t) * t, -(-rows // tr) * tr, -(-cols // tc) * tc
    view_idx = np.arange(nv) % views if periodic else np.pad(np.arange(views), (0, nv - views), mode="symmetric")
    padded = np.pad(x[view_idx].astype(np.float64), ((0, 0), (0, nr - rows), (0, nc - cols)), mode="symmetric")
    out = np.empty_like(padded)
    for v in range(0, nv, t):
        for r in range(0, nr, tr):
            for c in range(0, nc, tc):
                block = padded[v : v + t, r : r + tr, c : c + tc].reshape(t, -1)
                u, s, vt = np.linalg.svd(block, full_matrices=False)
                k = s >= keep * s[0]
                out[v : v + t, r : r + tr, c : c + tc] = ((u[:, k] * s[k]) @ vt[k]).reshape(t, tr, tc)
    return out[:views, :rows, :cols]


@pytest.mark.parametrize(
    ("shape", "overrides"),
    [
        ((48, 3, 40), {}),  # the paper's mode: whole views, the views a multiple of t
        ((45, 3, 40), {}),  # the last group reaches past the end
        ((45, 5, 37), {"tile_rows": 2, "tile_cols": 8}),  # tiles reach past the detector's edges
        ((64, 4, 32), {"threshold_value": 0.02, "views_per_group": 16, "tile_cols": 16}),  # several components
    ],
    ids=["whole-views", "ragged-views", "ragged-tiles", "rank-k"],
)
@pytest.mark.parametrize("periodic", [False, True])
def test_non_overlapping_groups_equal_a_per_block_svd(
    shape: tuple[int, int, int], overrides: dict[str, object], periodic: bool, rng: np.random.Generator
) -> None:
    x = rank1_scan(rng, *shape) + (0.05 * rng.standard_normal(shape)).astype(np.float32)
    config = DenoiseConfig.paper(**overrides)  # type: ignore[arg-type]
    y = denoise_projections(x, config=config, periodic=periodic)
    tr = min(config.tile_rows or shape[1], shape[1])
    tc = min(config.tile_cols or shape[2], shape[2])
    reference = _svd_blocks_reference(
        x, t=config.group_size, tr=tr, tc=tc, keep=config.threshold_value, periodic=periodic
    )
    assert float(np.abs(reference - x).mean()) > 0.01  # it does denoise
    np.testing.assert_allclose(y, reference, rtol=0, atol=1e-5)


def test_window_kernel_equals_whole_array_on_any_core(rng: np.random.Generator) -> None:
    x = rank1_scan(rng, views=40) + (0.05 * rng.standard_normal((40, 2, 40))).astype(np.float32)
    sigma = estimate_noise_sigma_of(x, config=BEST, i0_photons=None)
    whole = denoise_projections(x, config=BEST, periodic=False, noise_sigma=sigma)
    halo = BEST.view_halo
    padded = pad_views(x, halo=halo, periodic=False)
    for lo, hi in [(0, 7), (7, 8), (13, 40)]:
        part = denoise_view_window(padded[lo : hi + 2 * halo], first_view=lo, halo=halo, config=BEST, noise_sigma=sigma)
        np.testing.assert_allclose(part, whole[lo:hi], rtol=0, atol=1e-5)


# ---- bad inputs ---------------------------------------------------------------------------------------------
# The default mode, and the paper's mode, whose groups tile these scans' views (48, 64), so it runs unpadded.
BEST_AND_PAPER = pytest.mark.parametrize("config", [BEST, DenoiseConfig.paper()], ids=["best-log", "paper"])


@BEST_AND_PAPER
def test_nan_is_refused_naming_view_and_row(config: DenoiseConfig, rng: np.random.Generator) -> None:
    x = rank1_scan(rng)
    x[17, 1, 3] = np.nan
    with pytest.raises(InvalidInputError, match=r"view 17, row 1"):
        denoise_projections(x, config=config, periodic=False)


def test_inf_in_a_window_is_named_by_absolute_view(rng: np.random.Generator) -> None:
    x = pad_views(rank1_scan(rng), halo=BEST.view_halo, periodic=False)
    x[BEST.view_halo + 2, 0, 0] = np.inf
    with pytest.raises(InvalidInputError, match=r"view 102, row 0"):
        denoise_view_window(x, first_view=100, halo=BEST.view_halo, config=BEST, noise_sigma=0.1)


@BEST_AND_PAPER
def test_negative_line_integrals_beyond_noise_are_refused(config: DenoiseConfig, rng: np.random.Generator) -> None:
    x = rank1_scan(rng) + (0.01 * rng.standard_normal((48, 2, 40))).astype(np.float32)
    x[5:8, 0, 0] = -0.7
    with pytest.raises(InvalidInputError, match=r"3 line integral\(s\).*-0\.7 at view 5"):
        denoise_projections(x, config=config, periodic=False)


def test_small_negative_noise_around_air_is_accepted(rng: np.random.Generator) -> None:
    i0 = 1e4
    p = np.zeros((32, 1, 64), dtype=np.float64)
    noisy = np.log(i0 / rng.poisson(i0 * np.exp(-p))).astype(np.float32)  # about half are negative
    assert (noisy < 0).mean() > 0.3
    denoise_projections(noisy, config=DenoiseConfig(), periodic=True, i0_photons=i0)
    denoise_projections(noisy, config=BEST, periodic=True)


def test_fewer_views_than_a_group_are_refused(rng: np.random.Generator) -> None:
    x = rank1_scan(rng, views=12)
    with pytest.raises(InvalidInputError, match=r"12 view\(s\) are fewer than views_per_group=16"):
        denoise_projections(x, config=BEST, periodic=False)


def test_wrong_shape_and_dtype_are_refused() -> None:
    with pytest.raises(InvalidInputError, match="views, rows, cols"):
        denoise_projections(np.zeros((20, 30), np.float32), config=BEST, periodic=False)
    with pytest.raises(InvalidInputError, match="floating-point"):
        denoise_projections(np.zeros((20, 1, 30), np.int16), config=BEST, periodic=False)


@BEST_AND_PAPER
@pytest.mark.parametrize("shape", [(48, 0, 40), (48, 2, 0), (0, 2, 40)], ids=["no-rows", "no-cols", "no-views"])
def test_empty_projections_are_refused(config: DenoiseConfig, shape: tuple[int, int, int]) -> None:
    with pytest.raises(InvalidInputError, match=r"empty: shape \(" + r", ".join(map(str, shape))):
        denoise_projections(np.zeros(shape, np.float32), config=config, periodic=False)
    with pytest.raises(InvalidInputError, match="empty"):
        denoise_view_window(np.zeros(shape, np.float32), first_view=0, halo=0, config=config, noise_sigma=0.1)


def test_anscombe_without_i0_is_refused(rng: np.random.Generator) -> None:
    with pytest.raises(InvalidInputError, match="i0_photons"):
        denoise_projections(rank1_scan(rng), config=DenoiseConfig(), periodic=False)


def _geometry(range_deg: float, n_views: int = 48) -> Geometry:
    return Geometry(
        beam="parallel",
        n_views=n_views,
        angular_range_deg=range_deg,
        n_detector_cols=40,
        detector_pitch_mm=1.0,
        grid={"nx_pixels": 16, "ny_pixels": 16, "pixel_size_mm": 1.0},
    )


def test_periodic_views_need_a_full_circle() -> None:
    periodic = BEST.model_copy(update={"view_boundary": ViewBoundary.PERIODIC})
    assert resolve_periodic(periodic, _geometry(360.0), n_views=48)
    with pytest.raises(InvalidInputError, match="full-circle.*180.0 deg"):
        resolve_periodic(periodic, _geometry(180.0), n_views=48)
    with pytest.raises(InvalidInputError, match="unknown"):
        resolve_periodic(periodic, None, n_views=48)
    assert resolve_periodic(BEST, _geometry(360.0), n_views=48)
    assert not resolve_periodic(BEST, _geometry(200.0), n_views=48)
    assert not resolve_periodic(BEST, None, n_views=48)
    with pytest.raises(InvalidInputError, match="48 views but the projections have 50"):
        resolve_periodic(BEST, _geometry(360.0), n_views=50)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present")
def test_cuda_without_a_gpu_is_refused(rng: np.random.Generator) -> None:
    with pytest.raises(DeviceUnavailableError, match="CUDA"):
        denoise_projections(rank1_scan(rng), config=BEST, periodic=False, device="cuda")


@pytest.mark.gpu
@BEST_AND_PAPER  # the paper's mode on 64 views: the unpadded non-overlapping path on the device
def test_cuda_matches_cpu(config: DenoiseConfig, rng: np.random.Generator) -> None:
    x = rank1_scan(rng, views=64) + (0.05 * rng.standard_normal((64, 2, 40))).astype(np.float32)
    cpu = denoise_projections(x, config=config, periodic=True, noise_sigma=0.05)
    gpu = denoise_projections(x, config=config, periodic=True, noise_sigma=0.05, device="cuda")
    np.testing.assert_allclose(gpu, cpu, atol=1e-4)


def test_estimate_noise_sigma_refuses_bad_shape() -> None:
    with pytest.raises(InvalidInputError, match=r"\(k, 3, rows, cols\)"):
        estimate_noise_sigma(np.zeros((4, 2, 1, 8), np.float32))
    with pytest.raises(InvalidInputError, match=r"\(k, 3, rows, cols\)"):
        estimate_noise_sigma(np.zeros((4, 3, 0, 8), np.float32))


def _clean_scan(views: int = 64, rows: int = 5, cols: int = 45) -> np.ndarray:
    """A smooth full-circle scan (an off-centre cylinder's profile), rows slightly shifted."""
    v = np.arange(views)[:, None, None]
    r = np.arange(rows)[None, :, None]
    c = np.linspace(-1, 1, cols)[None, None, :]
    return 2.0 * np.clip(1 - (c - 0.3 * np.cos(2 * np.pi * v / views) + 0.02 * r) ** 2 / 0.4, 0, None)


def _noisy_scan(rng: np.random.Generator, views: int = 64, rows: int = 5, cols: int = 45) -> np.ndarray:
    clean = _clean_scan(views, rows, cols)
    counts = np.maximum(rng.poisson(2e3 * np.exp(-clean)), 0.5)
    return np.log(2e3 / counts).astype(np.float32)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tile_rows": 2},
        {"tile_rows": 4, "tile_stride_rows": 2},  # overlapping row tiles, 5 rows: mirrored past the edge
        {"tile_stride_cols": 16},
        {"second_pass": False},
        {"weighted_aggregation": False, "view_stride": 2},
        {"threshold_mode": ThresholdMode.AUTO_HARD, "view_stride": 1},
        {"views_per_group": 8, "view_stride": 8, "tile_cols": None, "tile_rows": None},
    ],
    ids=["default", "rows2", "rows4-overlap", "cols-overlap", "one-pass", "unweighted", "auto-hard", "whole-view"],
)
def test_banded_filter_equals_per_block_rebuild(overrides: dict[str, object], rng: np.random.Generator) -> None:
    """The banded path (cell-major end to end) equals rebuilding every block and averaging."""
    from tasks.denoise.kernels._blocks import per_block_denoise

    x = _noisy_scan(rng, views=70)  # not a multiple of the group; 5 rows x 45 cols: tiles reach past the edges
    config = DenoiseConfig.model_validate({"views_per_group": 16, **overrides})
    fast = denoise_projections(x, config=config, periodic=True, i0_photons=2e3)
    sigma = estimate_noise_sigma_of(x, config=config, i0_photons=2e3)
    padded = torch.from_numpy(pad_views(x, halo=config.view_halo, periodic=True))
    reference = per_block_denoise(
        padded, first_view=0, halo=config.view_halo, config=config, noise_sigma=sigma, i0_photons=2e3
    ).numpy()
    assert float(np.abs(reference - x).mean()) > 0.01  # it does denoise
    np.testing.assert_allclose(fast, reference, rtol=0, atol=2e-5)


def test_row_tiles_on_a_sinogram_are_single_rows(rng: np.random.Generator) -> None:
    """A 2-D sinogram (one detector row): the default 16-row tile is clipped to that row."""
    x = _noisy_scan(rng, rows=1)
    tiled = denoise_projections(x, config=DenoiseConfig(views_per_group=16), periodic=False, i0_photons=2e3)
    single = DenoiseConfig(views_per_group=16, tile_rows=1)
    np.testing.assert_array_equal(tiled, denoise_projections(x, config=single, periodic=False, i0_photons=2e3))


def test_row_tiles_share_the_noise_reduction_across_rows(rng: np.random.Generator) -> None:
    """Rows with the same signal: a tile over all of them removes more noise than tiles of one row."""
    clean = np.repeat(_clean_scan(rows=1), 8, axis=1)  # one sinogram in 8 rows ...
    noisy = (clean + rng.normal(0.0, 0.02, clean.shape)).astype(np.float32)  # ... with independent noise per row
    errors = []
    for rows in (1, 8):
        config = DenoiseConfig(views_per_group=16, domain=DenoiseDomain.LOG, tile_rows=rows)
        out = denoise_projections(noisy, config=config, periodic=True)
        errors.append(float(np.mean((out - clean) ** 2)))
    assert errors[1] < 0.8 * errors[0]


@pytest.mark.parametrize(
    ("rows", "cols", "overrides"),
    [
        (16, 64, {}),  # whole cells only
        (7, 45, {}),  # the last row and column cells reach past the detector
        (9, 77, {"tile_rows": 4, "tile_cols": 16, "tile_stride_rows": 2, "tile_stride_cols": 8}),  # r0, c0 < 0
        (1, 90, {}),  # a sinogram
    ],
    ids=["whole", "edges", "overlapping", "sinogram"],
)
def test_cells_written_one_by_one_equal_the_whole_layout(
    rows: int, cols: int, overrides: dict[str, object], rng: np.random.Generator
) -> None:
    """The final pass hands each cell straight to the result (``put_cell``): the same bins as ``from_cells``."""
    from tasks.denoise.kernels._banded import Cells
    from tasks.denoise.kernels._blocks import block_axes

    config = DenoiseConfig.model_validate({"views_per_group": 16, **overrides})
    _, rax, cax = block_axes(config, rows, cols, pilot=False)
    cells = Cells.of(rax, cax, rows, cols)
    values = torch.from_numpy(rng.standard_normal((cells.n_cells, 12, cells.m)).astype(np.float32))
    expected = cells.from_cells(values, 3, 7)
    res = torch.full((7, rows, cols), float("nan"))
    for i in range(cells.n_cells):
        cells.put_cell(res, i, values[i], 3)
    assert not torch.isnan(res).any()  # every detector bin written
    assert torch.equal(res, expected)
    # and round trip: the layout of a detector array, written back cell by cell, is that array
    det = torch.from_numpy(rng.standard_normal((5, rows, cols)).astype(np.float32))
    back = torch.empty_like(det)
    laid = cells.to_cells(det)
    for i in range(cells.n_cells):
        cells.put_cell(back, i, laid[i], 0)
    assert torch.equal(back, det)


@pytest.mark.gpu
@pytest.mark.parametrize("periodic", [False, True])
def test_cuda_matches_cpu_in_the_default_mode(periodic: bool, rng: np.random.Generator) -> None:
    """The default (Anscombe, two passes, banded, cell by cell into the result) on CUDA, with edge cells."""
    x = _noisy_scan(rng, views=70)  # 5 rows x 45 cols: the tiles reach past both edges
    config = DenoiseConfig(views_per_group=16)
    cpu = denoise_projections(x, config=config, periodic=periodic, i0_photons=2e3)
    gpu = denoise_projections(x, config=config, periodic=periodic, i0_photons=2e3, device="cuda")
    assert float(np.abs(cpu - x).mean()) > 0.01  # it does denoise
    np.testing.assert_allclose(gpu, cpu, atol=1e-4)


@pytest.mark.gpu
def test_cuda_refuses_bad_input_as_the_cpu_does(rng: np.random.Generator) -> None:
    """The whole-array CUDA path pads on the device: its checks still name the view, as on the CPU."""
    x = rank1_scan(rng) + (0.01 * rng.standard_normal((48, 2, 40))).astype(np.float32)
    low = x.copy()
    low[5:8, 0, 0] = -0.7
    with pytest.raises(InvalidInputError, match=r"3 line integral\(s\).*-0\.7 at view 5"):
        denoise_projections(low, config=BEST, periodic=False, device="cuda")
    bad = x.copy()
    bad[17, 1, 3] = np.nan
    with pytest.raises(InvalidInputError, match=r"view 17, row 1"):
        denoise_projections(bad, config=BEST, periodic=False, device="cuda")
    with pytest.raises(InvalidInputError, match="noise_sigma"):
        denoise_projections(x, config=BEST, periodic=False, noise_sigma=float("nan"), device="cuda")
