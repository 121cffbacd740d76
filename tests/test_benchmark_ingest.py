"""benchmarks/ingest.py still runs in its smallest mode and reports the ratios it documents."""

from __future__ import annotations

from tests.test_benchmarks import assert_finite_ratios, run_benchmark


def test_ingest_benchmark_reports_its_ratios(tmp_path):
    doc = run_benchmark("ingest.py", "--quick", json_path=tmp_path / "ingest.json", timeout=300)
    keys = (
        "dicom_ingest_vs_read_ratio",
        "dicom_ingest_vs_read_cpu_ratio",
        "flatdark_ingest_vs_read_cpu_ratio",
        "flatdark_ingest_vs_read_ratio",
        "flatdark_ingest_vs_copy_ratio",
        "peak_memory_4x_views_ratio",
        "peak_memory_over_scan_mb_ratio",
    )
    assert_finite_ratios(doc["ratios"], keys)
    assert [row["case"].split()[0] for row in doc["rows"]] == ["DICOM", "flat/dark", "flat/dark"]
