"""The benchmarks still run: each in its smallest mode as a subprocess, its JSON holding the ratio keys it documents.

These check that the code paths work and the keys are there and finite, not the numbers themselves (the smallest
modes are far too small for that). ``benchmarks/federated.py`` and ``benchmarks/pipeline.py`` have no run here
(their smallest modes take over a minute on 2 cores; ``worker_env.py`` runs the pipeline's stage drivers).
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

DENOISE_NOISY_CASES = ("A-parallel-720-I0=1e5", "B-fan-360-I0=2e4", "C-fan-1440-I0=2.5e3", "SL-parallel-360-I0=1e4")
DENOISE_METHODS = ("none", "gauss-views", "bm3d-anscombe", "fedscan-paper", "fedscan-best")


def run_benchmark(script: str, *args: str, json_path: Path, timeout: float) -> dict[str, Any]:
    """Run ``benchmarks/<script>`` from the repository root with ``--json json_path``; its parsed JSON."""
    proc = subprocess.run(
        [sys.executable, f"benchmarks/{script}", *args, "--json", str(json_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return json.loads(json_path.read_text())


def assert_finite_ratios(ratios: dict[str, Any], keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in ratios]
    assert not missing, f"missing ratio keys {missing}; present: {sorted(ratios)}"
    not_finite = {k: ratios[k] for k in keys if not math.isfinite(float(ratios[k]))}
    assert not not_finite, f"ratios not finite: {not_finite}"


@pytest.mark.parametrize(
    ("script", "own_option"),
    [
        ("denoise.py", "--stack-rows STACK_ROWS"),
        ("surrogate.py", "--speed-batch SPEED_BATCH"),
        ("pipeline.py", "--scans-per-site SCANS_PER_SITE"),  # with its metavar: the docstring names the flag too
        ("gpu.py", "--device DEVICE"),
        ("arrivals.py", "--databases DATABASES"),
        ("continual.py", "--shift-factor SHIFT_FACTOR"),
        ("privacy.py", "--point POINT"),
    ],
)
def test_help_lists_every_option_and_unknown_options_are_refused(script, own_option):
    help_run = subprocess.run(
        [sys.executable, f"benchmarks/{script}", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert help_run.returncode == 0, help_run.stderr[-4000:]
    assert own_option in help_run.stdout  # the benchmark's own option
    assert "--json JSON" in help_run.stdout  # and the common ones, in one listing
    bad = subprocess.run(
        [sys.executable, f"benchmarks/{script}", "--no-such-option"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2
    assert "unrecognized arguments: --no-such-option" in bad.stderr


@pytest.mark.slow
def test_surrogate_smoke(tmp_path):
    out = run_benchmark("surrogate.py", "--smoke", json_path=tmp_path / "surrogate.json", timeout=300)
    assert out["rows"]
    assert_finite_ratios(
        out["ratios"],
        (
            "attack_psnr_drop_db",
            "attack_psnr_drop_db_pool_attacker",
            "attack_gain_over_prior_db",
            "attack_pool_gain_over_prior_db",
            "surrogate_ssim",
            "auc_drop_vs_plaintext",
            "auc_drop_vs_plaintext_ci95",
            "auc_drop_vs_plaintext_iqem",
            "auc_drop_vs_plaintext_iqem_ci95",
            "hide_slices_per_s",
            "hide_speedup_vs_full_fft2",
            "host_identification_rate",
        ),
    )


@pytest.mark.slow
def test_denoise_quick(tmp_path):
    out = run_benchmark("denoise.py", "--quick", json_path=tmp_path / "denoise.json", timeout=400)
    ran = {(r["case"], r["method"]) for r in out["rows"]}
    expected = {(c, m) for c in DENOISE_NOISY_CASES for m in DENOISE_METHODS}
    expected |= {("clean-parallel-720", m) for m in DENOISE_METHODS if m != "bm3d-anscombe"}
    assert ran == expected
    ratios = out["ratios"]
    assert_finite_ratios(
        ratios,
        (
            "psnr_gain_minus_bm3d_db",
            "psnr_gain_minus_bm3d_db_ramlak",
            "min_gain_best_filter_db",
            "min_gain_hann_db",
            "min_gain_ramlak_db",
            "clean_ssim_hann_best_minus_none",
            "clean_ssim_ramlak_best_minus_none",
            "speed_vs_bm3d",
            "copy_bandwidth_gb_s",
            "throughput_elements_per_s",
            "bandwidth_fraction",
            "throughput_paper_elements_per_s",
            "bandwidth_fraction_paper",
            "paper_vs_best_throughput",
            "matmul_flops_per_element",
            "matmul_gflop_s_in_denoiser",
            "sgemm_peak_gflop_s",
            "matmul_time_share",
            "bandwidth_fraction_compute_ceiling",
            "linalg_seconds_floor",
            "bandwidth_fraction_linalg_ceiling",
            "throughput_one_cell_elements_per_s",
            "one_cell_vs_stack",
            "worker_scaling_2v1",
            "worker_scaling_ceiling_2v1",
            "worker_scaling_vs_ceiling",
        ),
    )
    for key in (
        "psnr_gain_minus_bm3d_db_by_case_hann",
        "psnr_gain_best_filter_minus_bm3d_db_by_case",
        "speed_vs_bm3d_by_case",
    ):
        assert set(ratios[key]) == set(DENOISE_NOISY_CASES), key
        assert all(math.isfinite(v) for v in ratios[key].values()), key
    # The products are counted, not assumed: a best mode without them (or a profiler that saw none) fails here.
    assert ratios["matmul_flops_per_element"] > 0
    assert 0 < ratios["matmul_time_share"] < 1
    assert len(ratios["span_sweep_hann_gain_db"]) == 4
    for gains in ratios["span_sweep_hann_gain_db"].values():
        assert len(gains) == len(DENOISE_NOISY_CASES)
        assert all(math.isfinite(v) for v in gains.values())


def test_storage_quick(tmp_path):
    out = run_benchmark(
        "storage.py",
        "--quick",
        "--repeats",
        "1",
        "--integrity-repeats",
        "1",
        json_path=tmp_path / "storage.json",
        timeout=180,
    )
    chosen = "blosc-zstd1-bitshuffle"
    cases = ("projections_f32", "counts_u16", "volume_f32")
    assert_finite_ratios(
        out["ratios"],
        tuple(f"{chosen}_ratio_{c}" for c in cases)
        + tuple(f"{chosen}_write_speed_vs_none_{c}" for c in cases)
        + ("checksum_write_overhead", "checksum_read_overhead")
        + tuple(f"checksum_{op}_overhead_{c}" for op in ("write", "read") for c in cases)
        + ("lease_overhead_s", "lease_stage_run_s", "lease_acquire_release_s"),
    )
    # a lease is taken and given back at least once per stage run: its direct cost is a real, positive time
    assert 0 < out["ratios"]["lease_acquire_release_s"] <= out["ratios"]["lease_stage_run_s"]


@pytest.mark.slow
def test_reconstruct_memory_quick(tmp_path):
    out = run_benchmark("reconstruct_memory.py", "--quick", json_path=tmp_path / "memory.json", timeout=300)
    assert len(out["rows"]) == 2
    assert_finite_ratios(out["ratios"], ("peak_growth_512_over_128", "peak_growth_512_over_projections"))


@pytest.mark.slow
def test_reconstruct_quick(tmp_path):
    out = run_benchmark("reconstruct.py", "--quick", json_path=tmp_path / "reconstruct.json", timeout=400)
    assert out["rows"]
    keys: tuple[str, ...] = ("peak_fraction",)
    if importlib.util.find_spec("astra") is not None:  # the peer's rows and ratios need ASTRA (a dev dependency)
        keys += (
            "fbp_speed_vs_astra",
            "fbp_speed_vs_astra_per_core",
            "fbp_psnr_minus_astra_db",
            "fbp_hann_psnr_minus_astra_db",
            "sart_iteration_speed_vs_astra_sirt",
            "fan_sart_iteration_speed_vs_astra_sirt",
            *(f"projection_rel_l2_vs_astra_{p}" for p in ("linear", "strip", "line_fanflat", "strip_fanflat")),
        )
    assert_finite_ratios(out["ratios"], keys)


@pytest.mark.slow
def test_worker_env_quick(tmp_path):
    out = run_benchmark(
        "worker_env.py",
        "--quick",
        "--size",
        "tiny",
        "--sites",
        "1",
        "--cache-dir",
        str(tmp_path / "cache"),
        json_path=tmp_path / "worker_env.json",
        timeout=400,
    )
    assert_finite_ratios(
        out["ratios"],
        ("speedup_denoise", "speedup_reconstruct", "speedup_surrogate", "speedup_total", "worker_peak_rss_ratio"),
    )


def test_gpu_benchmark_code_paths_on_the_cpu(tmp_path):
    """``gpu.py`` needs CUDA for its numbers; ``--device cpu`` runs every code path (and the CPU peer) here."""
    out = run_benchmark("gpu.py", "--device", "cpu", "--quick", json_path=tmp_path / "gpu.json", timeout=300)
    assert_finite_ratios(
        out["ratios"],
        (
            "gpu_copy_gb_s",
            "denoise_gpu_vs_cpu2",
            "denoise_gpu_bandwidth_fraction",
            "hide_gpu_vs_cpu2",
            "readback_pinned_speedup",
        ),
    )
    workloads = [r["workload"] for r in out["rows"]]
    assert sum(w.startswith("denoise") for w in workloads) == 2 and sum(w.startswith("hide") for w in workloads) == 4
    # the same device, on all of this machine's threads against 2: equal up to float32 rounding
    diffs = [r["max_abs_diff_vs_cpu"] for r in out["rows"] if "max_abs_diff_vs_cpu" in r]
    assert len(diffs) == 3 and max(diffs) < 1e-4, diffs


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch missing")
def test_gpu_benchmark_without_cuda_says_so(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is present here")
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu.py", "--quick"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert "no CUDA device is available" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_json_output_is_strict_json(tmp_path):
    sys.path.insert(0, str(ROOT))
    from benchmarks._common import write_json

    path = tmp_path / "out.json"
    rows = [{"case": "a", "rate": float("nan"), "n": np.int64(3), "x": np.float32(0.5)}]
    write_json(path, rows, {"speedup": float("inf"), "ok": 1.25, "by_case": {"a": np.float64("nan")}}, flag=True)

    def refuse(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name}")

    doc = json.loads(path.read_text(), parse_constant=refuse)
    assert doc == {
        "rows": [{"case": "a", "rate": None, "n": 3, "x": 0.5}],
        "ratios": {"speedup": None, "ok": 1.25, "by_case": {"a": None}},
        "flag": True,
    }
