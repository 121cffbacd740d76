"""What a GPU buys: the denoiser and FESF hiding on CUDA against the same machine's CPU on 2 torch threads.

Named peers, all measured in the same run on the same machine:

* the CPU on 2 torch threads (the 2 cores fedscan's targets are stated for) on the same inputs, whose results the
  GPU's must match (``*_max_abs_diff_vs_cpu``);
* the GPU's own device-to-device copy bandwidth (``gpu_copy_gb_s``): ``denoise_gpu_bandwidth_fraction`` is the
  end-to-end throughput × 8 bytes per element over it;
* a device-to-host copy of a 64 × 512² result into fresh pageable memory, against :func:`tasks.device.to_numpy`
  (page-locked): ``readback_pinned_speedup``.

Workloads: synthetic low-dose stacks (Poisson counts at I0 = 2.5e3, 1440 views over 360°) of 16 × 372 and
64 × 512 detector bins (``--quick``: 360 views, 8 × 64 and 16 × 128), denoised end to end (numpy in, numpy out) in
the best mode; hiding of 512² slices (``--quick``: 128²) into a device buffer at batches 8, 64 and 256, and once
numpy in / numpy out as the surrogate stage calls it.

Ratio keys: ``denoise_gpu_vs_cpu2`` (min over the stacks), ``hide_gpu_vs_cpu2`` (batch 8),
``denoise_gpu_bandwidth_fraction`` (the larger stack), ``readback_pinned_speedup``.

    python benchmarks/gpu.py [--quick] [--json out.json]        # needs CUDA
    python benchmarks/gpu.py --device cpu --quick                # the code paths only, without a GPU
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import on_threads, parse_args, print_table, write_json

I0 = 2.5e3


def low_dose_stack(views: int, rows: int, cols: int, seed: int) -> np.ndarray:
    """Line integrals of a smooth off-centre object over a full circle, with Poisson noise at :data:`I0`."""
    rng = np.random.default_rng(seed)
    angle = np.linspace(0, 2 * np.pi, views, endpoint=False)[:, None, None]
    u = np.linspace(-1, 1, cols)[None, None, :]
    r = np.arange(rows)[None, :, None]
    clean = 3.0 * np.clip(1 - (u - 0.3 * np.cos(angle) + 0.01 * r) ** 2 / 0.5, 0, None)
    counts = np.maximum(rng.poisson(I0 * np.exp(-clean)), 0.5)
    return np.log(I0 / counts).astype(np.float32)


def main() -> None:
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--device", default="cuda", help="device under test (cuda; cpu checks the code paths only)")
    args = parse_args(__doc__.split("\n")[0], parents=[extra])

    import torch

    from schemas.denoise import DenoiseConfig
    from tasks.denoise.kernels import denoise_projections, estimate_noise_sigma_of
    from tasks.device import resolve_device, to_numpy
    from tasks.errors import DeviceUnavailableError
    from tasks.surrogate.kernels import hide

    try:
        dev = resolve_device(args.device)
    except DeviceUnavailableError as exc:
        sys.exit(f"benchmarks/gpu.py: {exc}")

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def best(fn: Callable[[], Any], n: int) -> float:
        fn()  # warm-up: kernels, plans, the caching allocators
        sync()
        t = math.inf
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            sync()
            t = min(t, time.perf_counter() - t0)
        return t

    def on_cpu2(fn: Callable[[], Any], n: int) -> float:
        return on_threads(2, lambda: best(fn, n))()

    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"device under test: {name}; torch {torch.__version__}; CPU peer: 2 of {os.cpu_count()} cores", flush=True)

    def copy_bandwidth(elements: int) -> float:
        a = torch.empty(elements, device=dev)
        b = torch.empty_like(a)
        return 2 * a.numel() * 4 / best(lambda: b.copy_(a), 10)

    copy_bytes_per_s = copy_bandwidth(16 * 2**20 if args.quick else 64 * 2**20)

    rows: list[dict[str, object]] = []
    config = DenoiseConfig().model_copy(update={"views_per_group": 16})
    shapes = ((360, 8, 64), (360, 16, 128)) if args.quick else ((1440, 16, 372), (1440, 64, 512))
    for shape in shapes:
        stack = low_dose_stack(*shape, seed=1)
        sigma = estimate_noise_sigma_of(stack, config=config, i0_photons=I0)

        def denoise(device: torch.device, stack: np.ndarray = stack, sigma: float = sigma) -> np.ndarray:
            return denoise_projections(
                stack, config=config, periodic=True, i0_photons=I0, noise_sigma=sigma, device=device
            )

        t_dev = best(partial(denoise, dev), 3)
        t_cpu = on_cpu2(partial(denoise, torch.device("cpu")), 2)
        diff = float(np.abs(denoise(dev) - denoise(torch.device("cpu"))).max())
        rows.append(
            {
                "workload": "denoise " + "x".join(map(str, shape)),
                "device_per_s": round(stack.size / t_dev),
                "cpu2_per_s": round(stack.size / t_cpu),
                "device_vs_cpu2": round(t_cpu / t_dev, 2),
                "max_abs_diff_vs_cpu": diff,
            }
        )
        print(rows[-1], flush=True)

    n = 128 if args.quick else 512
    rng = np.random.default_rng(0)
    host = torch.from_numpy(rng.random((n, n), dtype=np.float32))
    hide_rows: dict[int, dict[str, object]] = {}
    for batch in (8, 64, 256):
        x = torch.from_numpy(rng.random((batch, n, n), dtype=np.float32))
        xd, hd = x.to(dev), host.to(dev)
        out = torch.empty_like(xd)
        t_dev = best(partial(hide, xd, hd, alpha=0.1, beta=0.5, out=out), 10)
        row: dict[str, object] = {"workload": f"hide {n}² batch {batch}", "device_per_s": round(batch / t_dev)}
        if batch == 8:
            cpu_out = torch.empty_like(x)
            t_cpu = on_cpu2(partial(hide, x, host, alpha=0.1, beta=0.5, out=cpu_out), 10)
            row["cpu2_per_s"] = round(batch / t_cpu)
            row["device_vs_cpu2"] = round(t_cpu / t_dev, 2)
            row["max_abs_diff_vs_cpu"] = float((out.cpu() - cpu_out).abs().max())
        hide_rows[batch] = row
        rows.append(row)
        print(row, flush=True)
    images = rng.random((64, n, n), dtype=np.float32)
    t_stage = best(lambda: hide(images, host.numpy(), alpha=0.1, beta=0.5, device=dev), 5)
    rows.append({"workload": f"hide {n}² batch 64, numpy in and out", "device_per_s": round(64 / t_stage)})

    result = torch.rand(64, n, n, device=dev)
    t_pageable = best(lambda: result.cpu().numpy(), 5)
    t_pinned = best(lambda: to_numpy(result), 5)
    rows.append({"workload": f"read back 64 x {n}²", "pageable_s": t_pageable, "to_numpy_s": t_pinned})

    denoise_rows = [r for r in rows if str(r["workload"]).startswith("denoise")]
    ratios: dict[str, object] = {
        "device": name,
        "gpu_copy_gb_s": round(copy_bytes_per_s / 1e9, 1),
        "denoise_gpu_vs_cpu2": min(float(r["device_vs_cpu2"]) for r in denoise_rows),  # type: ignore[arg-type]
        "denoise_gpu_bandwidth_fraction": round(
            float(denoise_rows[-1]["device_per_s"]) * 8 / copy_bytes_per_s,  # type: ignore[arg-type]
            5,
        ),
        "hide_gpu_vs_cpu2": hide_rows[8]["device_vs_cpu2"],
        "readback_pinned_speedup": round(t_pageable / t_pinned, 2),
    }
    print()
    print_table(rows, ratios)  # type: ignore[arg-type]
    write_json(args.json, rows, ratios)  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
