"""Benchmark of the projection denoiser against no denoising, a Gaussian along views and BM3D-on-Anscombe.

Every method's output is reconstructed by fedscan's own FBP, with the ram-lak and the Hann filter, and scored by
PSNR / SSIM against the true image. Regimes (issue 5):

* A: parallel beam, 720 views over 180 deg, high dose (I0 = 1e5);
* B: fan beam, 360 views over 360 deg, medium dose (I0 = 2e4);
* C: fan beam, 1440 views over 360 deg, low dose per view (I0 = 2.5e3);
* SL: the modified Shepp–Logan phantom (exact analytic line integrals), parallel 360 views, I0 = 1e4;
* clean: regime A's geometry without noise (a denoiser must not lower SSIM there).

Noise model: counts ~ Poisson(I0·exp(-p)), zero counts clamped to 0.5 before the log. The image is a real
abdomen slice from pydicom-data (``explicit_VR-UN.dcm``, HU → 1/mm with water 0.0192/mm), or ``--image``.

Usage::

    python benchmarks/denoise.py --quick --json out.json
    python benchmarks/denoise.py --image slice.npy --pixel-mm 0.86   # also --size N (grid side), --seed S

Ratios (against BM3D measured in the same run): ``psnr_gain_minus_bm3d_db`` (min over noisy regimes of the
best mode's Hann-FBP gain minus BM3D's), ``speed_vs_bm3d`` (min over regimes of BM3D time / best-mode time),
``bandwidth_fraction`` (best-mode throughput on a stack of ``--stack-rows`` detector rows of regime C, torch on 2
threads, × 8 bytes per element (one float32 read + one write) / the best measured copy bandwidth; the same
for the paper's mode, rank 1 of non-overlapping 8-view groups of whole views, in ``bandwidth_fraction_paper``),
``bandwidth_fraction_compute_ceiling`` (the compute roofline: the bandwidth fraction the best mode would reach if
its matrix products — ``matmul_flops_per_element``, counted by torch's ``FlopCounterMode`` — ran at
``sgemm_peak_gflop_s``, the named peer: one 2048² float32 product on 2 threads, and nothing else took any
time), ``bandwidth_fraction_linalg_ceiling`` (tighter: those products at that rate plus the call's own batched
``eigh`` and Cholesky factorisations, timed alone on the very matrices of a call, and nothing else),
``one_cell_vs_stack`` (throughput on one tile-wide column strip of the same stack, a single cell that stays
in cache, over the stack's: near 1 when memory traffic is not what limits the denoiser), and
``worker_scaling_2v1`` (a stack of ``--scaling-rows`` detector rows of regime C read from and written to Zarr
arrays on disk by a Dask distributed LocalCluster, 2 single-threaded worker processes vs 1, started with fedscan's
worker allocator settings), beside
``worker_scaling_ceiling_2v1`` (the named peer: independent pure-compute blocks on the same clusters, i.e. what
this machine's two vCPUs give at best) and their quotient ``worker_scaling_vs_ceiling``.

Regime A (high dose) is the one where the Hann-filtered reconstruction has almost no noise left to remove: its
PSNR is limited by the filter's blur, and every denoiser (BM3D included) loses a few hundredths of a dB there.
``min_gain_best_filter_db`` therefore scores each method with its better filter (ram-lak or Hann) against no
denoising with its better filter; that is the gain a user who picks the filter sees.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import best_time, on_threads, parse_args, sgemm_flops_per_s, write_json
from schemas.denoise import DenoiseConfig, DenoiseDomain
from schemas.geometry import Geometry
from tasks.denoise.chunked import estimate_noise_sigma_dask
from tasks.denoise.kernels import denoise_projections, estimate_noise_sigma, resolve_group_size

WATER_PER_MM = 0.0192
COUNTS_FLOOR = 0.5


@dataclass(frozen=True)
class Case:
    name: str
    beam: str
    n_views: int
    i0_photons: float | None  # None: noise-free
    phantom: str  # "image" | "shepp-logan"


def cases(quick: bool) -> list[Case]:
    k = 4 if quick else 1  # --quick: a quarter of the views (same angular ranges)
    return [
        Case("A-parallel-720-I0=1e5", "parallel", 720 // k, 1e5, "image"),
        Case("B-fan-360-I0=2e4", "fan", 360 // k, 2e4, "image"),
        Case("C-fan-1440-I0=2.5e3", "fan", 1440 // k, 2.5e3, "image"),
        Case("SL-parallel-360-I0=1e4", "parallel", 360 // k, 1e4, "shepp-logan"),
        Case("clean-parallel-720", "parallel", 720 // k, None, "image"),
    ]


def geometry_for(case: Case, n: int, pixel_mm: float) -> Geometry:
    grid = {"nx_pixels": n, "ny_pixels": n, "pixel_size_mm": pixel_mm}
    cols = math.ceil(n * 1.45)
    if case.beam == "parallel":
        return Geometry(
            beam="parallel",
            n_views=case.n_views,
            angular_range_deg=180.0,
            n_detector_cols=cols,
            detector_pitch_mm=pixel_mm,
            grid=grid,
        )
    return Geometry(
        beam="fan",
        n_views=case.n_views,
        angular_range_deg=360.0,
        n_detector_cols=cols,
        detector_pitch_mm=2.0 * pixel_mm,  # magnification 2: the same sampling at the isocentre
        source_to_isocenter_mm=1.5 * n * pixel_mm,
        source_to_detector_mm=3.0 * n * pixel_mm,
        grid=grid,
    )


def load_image(path: Path | None, pixel_mm: float | None, n: int) -> tuple[np.ndarray, float]:
    """The test image (1/mm) resampled to n × n, and its pixel size in mm."""
    from skimage.transform import resize

    if path:
        image = np.load(path).astype(np.float32)
        if image.ndim != 2 or pixel_mm is None:
            raise SystemExit("--image needs a 2-D .npy array in 1/mm and --pixel-mm")
        source_mm = pixel_mm
    else:
        import pydicom
        from pydicom.data import get_testdata_file

        ds = pydicom.dcmread(str(get_testdata_file("explicit_VR-UN.dcm")))
        hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        image = np.clip((hu / 1000.0 + 1.0) * WATER_PER_MM, 0.0, None).astype(np.float32)
        source_mm = float(ds.PixelSpacing[0])
    side = max(image.shape)
    out = resize(image, (n, n), anti_aliasing=True, preserve_range=True).astype(np.float32)
    return np.clip(out, 0.0, None), source_mm * side / n


def simulate(clean: np.ndarray, i0: float | None, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    if i0 is None:
        return clean.astype(np.float32), None
    counts = np.maximum(rng.poisson(i0 * np.exp(-clean.astype(np.float64))), COUNTS_FLOOR)
    return np.log(i0 / counts).astype(np.float32), counts


def unbiased_inverse_anscombe(z: np.ndarray) -> np.ndarray:
    r = math.sqrt(1.5)
    z = np.maximum(z, 1.0)
    return 0.25 * z**2 + 0.25 * r / z - 1.375 / z**2 + 0.625 * r / z**3 - 0.125


def bm3d_anscombe(noisy: np.ndarray, i0: float) -> np.ndarray:
    """BM3D on Anscombe-stabilised counts (σ estimated from the data), exact unbiased inverse, log."""
    import bm3d

    counts = i0 * np.exp(-noisy.astype(np.float64))
    z = 2.0 * np.sqrt(counts + 0.375)
    idx = np.arange(0, noisy.shape[0] - 2, max(1, (noisy.shape[0] - 2) // 64))[:, None] + np.arange(3)
    sigma = estimate_noise_sigma(noisy[idx][:, :, None, :], domain=DenoiseDomain.ANSCOMBE, i0_photons=i0)
    zd = bm3d.bm3d(z, sigma_psd=sigma)
    return np.log(i0 / np.maximum(unbiased_inverse_anscombe(zd), COUNTS_FLOOR)).astype(np.float32)


def gaussian_views(noisy: np.ndarray, sigma_views: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter1d

    return gaussian_filter1d(noisy, sigma_views, axis=0, mode="wrap").astype(np.float32)


def best_config() -> DenoiseConfig:
    return DenoiseConfig()


def methods(case: Case, geometry: Geometry) -> dict[str, object]:
    paper = DenoiseConfig.paper()
    best = resolve_group_size(best_config(), geometry)
    periodic = geometry.is_full_circle
    i0 = case.i0_photons
    out: dict[str, object] = {"none": lambda s: s, "gauss-views": lambda s: gaussian_views(s, 1.0)}
    if i0 is not None:
        out["bm3d-anscombe"] = lambda s: bm3d_anscombe(s, i0)
    out["fedscan-paper"] = lambda s: denoise_projections(s[:, None], config=paper, periodic=periodic)[:, 0]
    if i0 is not None:
        out["fedscan-best"] = lambda s: denoise_projections(s[:, None], config=best, periodic=periodic, i0_photons=i0)[
            :, 0
        ]
    else:  # no noise model without a dose: a nominal I0 (the auto threshold then sees ~no noise)
        out["fedscan-best"] = lambda s: denoise_projections(s[:, None], config=best, periodic=periodic, i0_photons=1e5)[
            :, 0
        ]
    return out


def score(rec: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    from skimage.metrics import structural_similarity

    rng_ = float(truth.max() - truth.min())
    mse = float(np.mean((rec - truth) ** 2))
    psnr = 10.0 * math.log10(rng_**2 / mse)
    ssim = float(structural_similarity(truth, rec.astype(np.float32), data_range=rng_))
    return psnr, ssim


def copy_bandwidth_bytes_per_s() -> float:
    """Read+write bandwidth of a large copy, bytes/s: the best of 3 numpy (1 thread) and 3 torch (2 threads) copies.

    The faster of the two is the floor: a denoiser that reads its input and writes its output once, at this
    bandwidth, moves 8 bytes per float32 element.
    """
    import torch

    a = np.ones(64 * 2**20, dtype=np.float32)  # 256 MB, far beyond the caches
    b = np.empty_like(a)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    copies = (lambda: np.copyto(b, a), lambda: tb.copy_(ta))
    best = on_threads(2, lambda: min(best_time(copy, repeat=3)[0] for copy in copies))()
    return 2 * a.nbytes / float(best)


def matmul_profile(stack: np.ndarray, i0: float, geometry: Geometry) -> tuple[float, float]:
    """FLOPs per element of the best mode's matrix products on ``stack``, and the seconds they took inside a call
    (2 threads): the fewest of 3 calls.

    Counted by torch's ``FlopCounterMode`` (the products' own shapes) in one call, and timed by a dispatch mode
    around each product (bmm / mm / addmm / baddbmm) in 3 more. The mode's own cost falls on the other ops, so the
    products' share of a call is taken against the plain call's time (:func:`stack_throughput`). No profiler:
    Kineto prints to stderr on every start and stop.
    """
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    products = {aten.bmm, aten.mm, aten.addmm, aten.baddbmm}

    class ProductTimer(TorchDispatchMode):
        seconds = 0.0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket not in products:
                return func(*args, **(kwargs or {}))
            t0 = time.perf_counter()
            result = func(*args, **(kwargs or {}))
            self.seconds += time.perf_counter() - t0
            return result

    config = resolve_group_size(best_config(), geometry)

    def call() -> None:
        denoise_projections(stack, config=config, periodic=geometry.is_full_circle, i0_photons=i0)

    def measure() -> tuple[float, float]:
        with FlopCounterMode(display=False) as flops:  # its bookkeeping slows every op: counted apart
            call()
        seconds = math.inf
        for _ in range(3):
            with ProductTimer() as timer:
                call()
            seconds = min(seconds, timer.seconds)
        return flops.get_total_flops() / stack.size, seconds

    flops_per_element, seconds = on_threads(2, measure)()
    return float(flops_per_element), float(seconds)


def factorization_seconds(stack: np.ndarray, i0: float, geometry: Geometry) -> float:
    """Seconds the best mode's own factorisations take alone on ``stack``, 2 threads: the batched ``eigh`` of the
    first pass and the Cholesky factorisation and inverse of the second, each run on the very matrices of a call
    (captured by a dispatch mode), best of 3 runs each."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    factorizations = {aten._linalg_eigh, aten.linalg_cholesky_ex, aten.cholesky_inverse}
    captured: list[tuple[object, tuple[object, ...], dict[str, object]]] = []

    class Capture(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in factorizations:
                captured.append((func, tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args), kwargs))
            return func(*args, **(kwargs or {}))

    config = resolve_group_size(best_config(), geometry)

    def run_all() -> None:
        for func, args, kwargs in captured:
            func(*args, **(kwargs or {}))  # type: ignore[operator]

    def measure() -> float:
        with Capture():
            denoise_projections(stack, config=config, periodic=geometry.is_full_circle, i0_photons=i0)
        return best_time(run_all, repeat=3)[0]

    return float(on_threads(2, measure)())


def noisy_stack(clean: np.ndarray, i0: float, rng: np.random.Generator, *, rows: int) -> np.ndarray:
    """(views, rows, cols): ``rows`` independent noisy copies of one sinogram (the throughput workload)."""
    return np.stack([simulate(clean, i0, rng)[0] for _ in range(rows)], axis=1)


def stack_throughput(stack: np.ndarray, i0: float, geometry: Geometry, *, paper: bool = False) -> float:
    """Elements per second of the best mode (or the paper's) on a (views, rows, cols) stack, torch on 2 threads.

    The production case is a 3-D scan: one call on many detector rows (the per-sinogram times above include the
    fixed per-call costs). Best of 3 calls, torch on 2 threads (the 2 cores of this machine).
    """
    config = DenoiseConfig.paper() if paper else resolve_group_size(best_config(), geometry)

    def call() -> None:
        denoise_projections(stack, config=config, periodic=geometry.is_full_circle, i0_photons=i0)

    return stack.size / float(on_threads(2, lambda: best_time(call, repeat=3)[0])())


def span_sweep(
    inputs: list[tuple[Case, Geometry, np.ndarray, np.ndarray, float]], spans: tuple[float | None, ...]
) -> dict[str, dict[str, float]]:
    """Hann-FBP PSNR gain of the best mode per regime for each group span (None: views_per_group=16 fixed)."""
    from tasks.reconstruct.kernels import fbp

    out: dict[str, dict[str, float]] = {}
    for span in spans:
        update: dict[str, object] = {"views_per_group": 16} if span is None else {"group_span_deg": span}
        config = best_config().model_copy(update=update)
        gains: dict[str, float] = {}
        for case, geometry, noisy, truth, base_hann in inputs:
            assert case.i0_photons is not None
            c = resolve_group_size(config, geometry)
            den = denoise_projections(
                noisy[:, None], config=c, periodic=geometry.is_full_circle, i0_photons=case.i0_photons
            )[:, 0]
            rec = np.asarray(fbp(den[None], geometry, filter_name="hann"))[0]
            gains[f"{case.name} (t={c.views_per_group})"] = round(score(rec, truth)[0] - base_hann, 3)
        out["fixed t=16" if span is None else f"span {span:g} deg"] = gains
    return out


def _one_torch_thread() -> None:
    import torch

    torch.set_num_threads(1)


def _compute_block(seed: int, reps: int = 400) -> float:
    """The ceiling's unit of work: single-threaded 256² float32 matmuls, no I/O, no shared state."""
    import torch

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(256, 256, generator=g), torch.randn(256, 256, generator=g)
    for _ in range(reps):
        a = torch.tanh(a @ b)
    return float(a.sum())


def worker_scaling(
    stack: np.ndarray, i0: float, geometry: Geometry, *, workdir: Path
) -> tuple[float, float, float, float]:
    """Seconds to denoise a Zarr-stored stack into a Zarr array on a LocalCluster of 1 and of 2 workers, and the
    same clusters' seconds for the ceiling peer.

    The production data path: the input lies in a Zarr array on disk (chunks of 1/8 of the views), the workers
    read their chunks (with the halo) themselves and write the result chunk by chunk into another Zarr array;
    nothing passes through the client. Worker processes, one thread each, torch on one thread, started with
    fedscan's :data:`schemas.settings.WORKER_ALLOCATOR_ENVIRON`; best of 2 runs after a warm-up run.

    The ceiling (named peer): 8 independent blocks of pure compute (:func:`_compute_block`) on the same cluster,
    right after each denoise run. Its 2-vs-1 ratio is what this machine's two vCPUs give to work that needs no
    memory traffic, no I/O and no coordination; on this VM it is not 2.
    """
    import dask.array as da
    import zarr
    from dask.distributed import Client, LocalCluster

    from schemas.settings import WORKER_ALLOCATOR_ENVIRON
    from tasks.cluster import worker_environ
    from tasks.denoise.chunked import denoise_dask

    config = best_config()
    resolved = resolve_group_size(config, geometry)
    chunk = max(4 * resolved.view_halo, stack.shape[0] // 8)
    source = zarr.open_array(
        str(workdir / "projections.zarr"), mode="w", shape=stack.shape, chunks=(chunk, *stack.shape[1:]), dtype="f4"
    )
    source[...] = stack
    sigma = estimate_noise_sigma_dask(da.from_zarr(str(workdir / "projections.zarr")), config=resolved, i0_photons=i0)
    times, ceiling = [], []
    for workers in (1, 2):
        with worker_environ(WORKER_ALLOCATOR_ENVIRON):  # the worker processes' allocator settings, as fedscan's
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
        with cluster, Client(cluster) as client:
            client.run(_one_torch_thread)
            best = best_ceiling = math.inf
            for run in range(3):  # run 0 warms the workers up (imports, first call)
                x = da.from_zarr(str(workdir / "projections.zarr"))
                lazy, _ = denoise_dask(x, config=config, geometry=geometry, i0_photons=i0, noise_sigma=sigma)
                t0 = time.perf_counter()
                da.to_zarr(lazy, str(workdir / f"denoised-{workers}-{run}.zarr"), overwrite=True)
                if run:
                    best = min(best, time.perf_counter() - t0)
                t0 = time.perf_counter()
                client.gather(client.map(_compute_block, range(8), pure=False))
                if run:
                    best_ceiling = min(best_ceiling, time.perf_counter() - t0)
        times.append(best)
        ceiling.append(best_ceiling)
    return times[0], times[1], ceiling[0], ceiling[1]


def main() -> None:
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--size", type=int, help="reconstruction grid side, pixels (default 96 quick / 256)")
    extra.add_argument("--seed", type=int, default=0, help="seed of the Poisson noise")
    extra.add_argument("--stack-rows", type=int, default=16, help="detector rows of the throughput stack")
    extra.add_argument(
        "--scaling-rows", type=int, default=None, help="detector rows of the worker-scaling stack (16 quick / 64)"
    )
    args = parse_args(__doc__.split("\n")[0], image=True, parents=[extra])
    args.scaling_rows = args.scaling_rows or (16 if args.quick else 64)

    import torch

    from tasks.phantoms import line_integrals, render, shepp_logan
    from tasks.reconstruct.kernels import fbp, forward_project

    # One torch thread per call: parallelism is Dask's (see worker_scaling_2v1); on a shared 2-core machine
    # torch's own threads made small calls 5x slower.
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning)
    n = args.size or (96 if args.quick else 256)
    image, pixel_mm = load_image(args.image, args.pixel_mm, n)
    rng = np.random.default_rng(args.seed)
    rows: list[dict[str, object]] = []
    header = f"{'case':24s} {'method':14s} {'PSNR rl':>8s} {'gain':>6s} {'PSNR hn':>8s} {'gain':>6s} "
    header += f"{'SSIM rl':>7s} {'SSIM hn':>7s} {'time s':>8s} {'Melem/s':>8s}"
    print(header)
    stack_input: tuple[np.ndarray, float, Geometry, np.random.Generator] | None = None
    sweep_inputs: list[tuple[Case, Geometry, np.ndarray, np.ndarray, float]] = []
    for case in cases(args.quick):
        geometry = geometry_for(case, n, pixel_mm)
        if case.phantom == "shepp-logan":
            ellipses = shepp_logan(0.45 * n * pixel_mm)
            truth = render(ellipses, geometry.grid, supersample=4)
            clean = line_integrals(ellipses, geometry).astype(np.float32)
            clean = clean.reshape(geometry.n_views, geometry.n_detector_cols)
        else:
            truth = image
            clean = np.asarray(forward_project(image[None], geometry))[0]
        noisy, _ = simulate(clean, case.i0_photons, rng)
        if case.name.startswith("C") and case.i0_photons is not None:
            stack_input = (clean, case.i0_photons, geometry, np.random.default_rng(args.seed + 1))
        base: dict[str, float] = {}
        for name, method in methods(case, geometry).items():
            t0 = time.perf_counter()
            out = method(noisy)  # type: ignore[operator]
            elapsed = time.perf_counter() - t0 if name != "none" else 0.0
            row: dict[str, object] = {"case": case.name, "method": name, "views": case.n_views, "cols": n}
            row["cols"] = geometry.n_detector_cols
            filters: tuple[tuple[Literal["ram-lak", "hann"], str], ...] = (("ram-lak", "ramlak"), ("hann", "hann"))
            for filt, key in filters:
                rec = np.asarray(fbp(out[None], geometry, filter_name=filt))[0]
                psnr, ssim = score(rec, truth)
                row[f"psnr_{key}_db"] = round(psnr, 3)
                row[f"ssim_{key}"] = round(ssim, 4)
                if name == "none":
                    base[key] = psnr
                row[f"gain_{key}_db"] = round(psnr - base[key], 3)
            row["sinogram_mse"] = float(np.mean((out - clean) ** 2))
            row["time_s"] = round(elapsed, 4)
            row["elements_per_s"] = round(noisy.size / elapsed) if elapsed > 0 else None
            rows.append(row)
            if name == "none" and case.i0_photons is not None:
                sweep_inputs.append((case, geometry, noisy, truth, float(row["psnr_hann_db"])))  # type: ignore[arg-type]
            eps = float(noisy.size / elapsed) if elapsed > 0 else 0.0
            print(
                f"{case.name:24s} {name:14s} {row['psnr_ramlak_db']:8.2f} {row['gain_ramlak_db']:+6.2f} "
                f"{row['psnr_hann_db']:8.2f} {row['gain_hann_db']:+6.2f} {row['ssim_ramlak']:7.4f} "
                f"{row['ssim_hann']:7.4f} {elapsed:8.3f} {eps / 1e6:8.2f}",
                flush=True,
            )

    def get(case: str, method: str, key: str) -> float:
        for r in rows:
            if r["case"] == case and r["method"] == method:
                return float(r[key])  # type: ignore[arg-type]
        raise KeyError((case, method))

    noisy_cases = [c.name for c in cases(args.quick) if c.i0_photons is not None]
    gains = {
        key: [get(c, "fedscan-best", f"gain_{key}_db") - get(c, "bm3d-anscombe", f"gain_{key}_db") for c in noisy_cases]
        for key in ("hann", "ramlak")
    }
    speed = [get(c, "bm3d-anscombe", "time_s") / get(c, "fedscan-best", "time_s") for c in noisy_cases]

    def best_filter_gain(case: str, method: str) -> float:  # each method's better filter vs none's better one
        psnr = max(get(case, method, "psnr_hann_db"), get(case, method, "psnr_ramlak_db"))
        return psnr - max(get(case, "none", "psnr_hann_db"), get(case, "none", "psnr_ramlak_db"))

    gains_best = [best_filter_gain(c, "fedscan-best") - best_filter_gain(c, "bm3d-anscombe") for c in noisy_cases]
    bandwidth = copy_bandwidth_bytes_per_s()
    assert stack_input is not None
    stack_clean, stack_i0, stack_geometry, stack_rng = stack_input
    stack = noisy_stack(stack_clean, stack_i0, stack_rng, rows=args.stack_rows)
    throughput, stack_elements = stack_throughput(stack, stack_i0, stack_geometry), stack.size
    throughput_paper = stack_throughput(stack, stack_i0, stack_geometry, paper=True)
    # The same views and rows, one tile of columns wide from the middle: one cell, a few MB that stay in cache and
    # whose arrays come back from the heap (no page faults). If memory traffic limited the stack, this would be
    # much faster per element.
    tile = best_config().tile_cols or stack.shape[2]
    mid = (stack.shape[2] // 2 // tile) * tile
    one_cell = np.ascontiguousarray(stack[:, :, mid : mid + tile])
    throughput_one_cell = stack_throughput(one_cell, stack_i0, stack_geometry)
    # Compute roofline: the best mode's matrix products (FLOPs per element, their share of a call) against the
    # machine's large-matmul rate. The ceiling is the bandwidth fraction if those products ran at that rate and
    # everything else (layout copies, transforms, eigh / Cholesky) cost nothing.
    flops_per_element, matmul_seconds = matmul_profile(stack, stack_i0, stack_geometry)
    peak = on_threads(2, sgemm_flops_per_s)()  # the named peer: 2 threads, as the stack's throughput
    # Tighter: the products at that peak plus the call's own eigh and Cholesky work at LAPACK's speed.
    linalg_seconds = flops_per_element * stack_elements / peak + factorization_seconds(stack, stack_i0, stack_geometry)
    clean_case = next(c.name for c in cases(args.quick) if c.i0_photons is None)
    ratios: dict[str, object] = {
        "psnr_gain_minus_bm3d_db": round(min(gains["hann"]), 3),
        "psnr_gain_minus_bm3d_db_ramlak": round(min(gains["ramlak"]), 3),
        "psnr_gain_minus_bm3d_db_by_case_hann": dict(
            zip(noisy_cases, [round(g, 3) for g in gains["hann"]], strict=True)
        ),
        "psnr_gain_best_filter_minus_bm3d_db_by_case": dict(
            zip(noisy_cases, [round(g, 3) for g in gains_best], strict=True)
        ),
        "min_gain_best_filter_db": round(min(best_filter_gain(c, "fedscan-best") for c in noisy_cases), 3),
        "min_gain_hann_db": round(min(get(c, "fedscan-best", "gain_hann_db") for c in noisy_cases), 3),
        "min_gain_ramlak_db": round(min(get(c, "fedscan-best", "gain_ramlak_db") for c in noisy_cases), 3),
        "clean_ssim_hann_best_minus_none": round(
            get(clean_case, "fedscan-best", "ssim_hann") - get(clean_case, "none", "ssim_hann"), 5
        ),
        "clean_ssim_ramlak_best_minus_none": round(
            get(clean_case, "fedscan-best", "ssim_ramlak") - get(clean_case, "none", "ssim_ramlak"), 5
        ),
        "speed_vs_bm3d": round(min(speed), 1),
        "speed_vs_bm3d_by_case": dict(zip(noisy_cases, [round(s, 1) for s in speed], strict=True)),
        "copy_bandwidth_gb_s": round(bandwidth / 1e9, 2),
        "throughput_elements_per_s": round(throughput),
        "throughput_stack_elements": stack_elements,
        "throughput_one_cell_elements_per_s": round(throughput_one_cell),
        "one_cell_vs_stack": round(throughput_one_cell / throughput, 3),
        "bandwidth_fraction": round(throughput * 8 / bandwidth, 5),
        "throughput_paper_elements_per_s": round(throughput_paper),
        "bandwidth_fraction_paper": round(throughput_paper * 8 / bandwidth, 5),
        "paper_vs_best_throughput": round(throughput_paper / throughput, 2),
        "matmul_flops_per_element": round(flops_per_element, 1),
        "matmul_gflop_s_in_denoiser": round(flops_per_element * stack_elements / matmul_seconds / 1e9, 2),
        "sgemm_peak_gflop_s": round(peak / 1e9, 2),
        "matmul_time_share": round(matmul_seconds * throughput / stack_elements, 3),
        "bandwidth_fraction_compute_ceiling": round(peak / flops_per_element * 8 / bandwidth, 4),
        "linalg_seconds_floor": round(linalg_seconds, 4),
        "bandwidth_fraction_linalg_ceiling": round(stack_elements / linalg_seconds * 8 / bandwidth, 4),
        "span_sweep_hann_gain_db": span_sweep(sweep_inputs, (None, 2.0, 4.0, 8.0)),
        "config_best": best_config().model_dump(mode="json"),
        "config_best_hash": best_config().config_hash(),
        "size_pixels": n,
    }
    scaling_stack = noisy_stack(stack_clean, stack_i0, stack_rng, rows=args.scaling_rows)
    with tempfile.TemporaryDirectory(prefix="fedscan-denoise-scaling-") as tmp:
        t1, t2, c1, c2 = worker_scaling(scaling_stack, stack_i0, stack_geometry, workdir=Path(tmp))
    ratios["worker_scaling_2v1"] = round(t1 / t2, 3)
    ratios["worker_seconds_1_2"] = [round(t1, 3), round(t2, 3)]
    ratios["worker_scaling_ceiling_2v1"] = round(c1 / c2, 3)
    ratios["worker_scaling_vs_ceiling"] = round((t1 / t2) / (c1 / c2), 3)
    ratios["worker_ceiling_seconds_1_2"] = [round(c1, 3), round(c2, 3)]
    ratios["worker_scaling_elements"] = scaling_stack.size
    print()
    for key, value in ratios.items():
        if key not in ("config_best", "span_sweep_hann_gain_db"):
            print(f"{key}: {value}")
    for label, gains_by_case in ratios["span_sweep_hann_gain_db"].items():  # type: ignore[attr-defined]
        print(f"sweep {label}: {gains_by_case}")
    write_json(args.json, rows, ratios)  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
