"""benchmarks/continual.py runs on tiny settings and reports every ratio key it documents (not the numbers)."""

from __future__ import annotations

import math

import pytest

from tests.test_benchmarks import assert_finite_ratios, run_benchmark

TINY = (
    "--quick", "--sites", "2", "--nights", "2", "--scans-per-night", "1", "--test-scans", "1", "--slices", "6",
    "--rounds", "2", "--warm-rounds", "1", "--boot", "50", "--shift-night", "1", "--speed-batch", "2", "--speed-size", "128",
)  # fmt: skip


@pytest.mark.slow
def test_continual_benchmark_reports_its_ratios(tmp_path):
    doc = run_benchmark("continual.py", *TINY, json_path=tmp_path / "continual.json", timeout=300)
    ratios = doc["ratios"]
    assert_finite_ratios(
        ratios,
        (
            "auc_warm_minus_scratch",
            "compute_warm_vs_scratch",
            "auc_personalised_minus_global",
            "auc_forgetting",
            "auc_forgetting_scratch",
            "diagnose_slices_per_s",
            "surrogate_slices_per_s",
            "diagnose_vs_surrogate_throughput",
            "diagnose_resampled_vs_surrogate_throughput",
            "diagnose_unoptimised_slices_per_s",
            "diagnose_vs_unoptimised_speedup",
        ),
    )
    assert set(ratios["auc_personalised_minus_global_by_site"]) == {"A", "B"}
    assert ratios["auc_personalised_minus_global"] == min(ratios["auc_personalised_minus_global_by_site"].values())
    # the warm arm ran 1 round where scratch ran 2, on the same data: half the optimizer steps, counted not assumed
    assert ratios["compute_warm_vs_scratch"] == pytest.approx(0.5)
    for key in ("auc_warm_minus_scratch", "auc_forgetting"):
        lo, hi = doc["ratio_ci95"][key]
        assert -1 <= lo <= hi <= 1
    assert len(doc["targets"]) == 5
    assert set(doc["targets"].values()) <= {"met", "missed", "undecided"}
    assert doc["targets"]["compute_warm_vs_scratch_at_most_0.35"] == "missed"  # 0.5 on these settings
    rows = doc["rows"]
    assert len(rows) == 2 * 4 * 3  # nights x arms x (2 sites + pooled)
    night0 = {(r["arm"], r["site"]): r["auc_future"] for r in rows if r["night"] == 0}
    for site in ("A", "B", "pooled"):  # night 0: frozen, scratch and warm are one model
        assert night0["frozen", site] == night0["scratch", site] == night0["warm", site]
    pooled = {(r["night"], r["arm"]): r for r in rows if r["site"] == "pooled"}
    assert pooled[1, "frozen"]["train_examples"] == 0 < pooled[1, "warm"]["train_examples"]
    assert pooled[1, "personalised"]["train_examples"] > pooled[1, "warm"]["train_examples"]
    # site A changes protocol from night 1: the night-0 models' future (night 1) scans are marked shifted
    assert {(r["night"], r["site"]) for r in rows if r["future_shifted"]} == {(0, "A"), (1, "A")}
    assert all(math.isfinite(r["auc_future"]) for r in rows)


def test_throughput_only_reports_the_throughput_rows_alone(tmp_path):
    doc = run_benchmark(
        "continual.py",
        "--quick", "--throughput-only", "--speed-batch", "2", "--speed-size", "64", "--grid", "32",
        json_path=tmp_path / "throughput.json",
        timeout=300,
    )  # fmt: skip
    ratios = doc["ratios"]
    keys = (
        "diagnose_slices_per_s",
        "surrogate_slices_per_s",
        "diagnose_vs_surrogate_throughput",
        "diagnose_unoptimised_slices_per_s",
        "diagnose_vs_unoptimised_speedup",
        "diagnose_resampled_slices_per_s",
    )
    assert_finite_ratios(ratios, keys)
    assert ratios["diagnose_vs_surrogate_throughput"] == pytest.approx(
        ratios["diagnose_slices_per_s"] / ratios["surrogate_slices_per_s"]
    )
    assert doc["rows"] == [] and doc["mode"] == "throughput-only"  # no nights were simulated
