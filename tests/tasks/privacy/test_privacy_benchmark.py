"""benchmarks/privacy.py runs in its smallest mode and writes the ratio keys it documents, finite."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

KEYS = (
    "linkage_top1_vs_chance",
    "linkage_top1_vs_chance_N10",
    "known_plaintext_psnr_gain_db",
    "known_plaintext_psnr_db_no_pair",
    "known_plaintext_unet_psnr_gain_db_k10",
    "iqem_discriminator_auc",
    "iqem_discriminator_auc_without",
    "discriminator_auc_unprotected",
    "auc_drop_vs_plaintext",
    "auc_drop_vs_plaintext_ci95",
)
POINT_KEYS = (
    "auc_drop",
    "auc_drop_ci95",
    "linkage_top1_vs_chance_N10",
    "linkage_top1_vs_chance_N100",
    "known_plaintext_psnr_gain_db_k10",
    "discriminator_auc",
)


@pytest.mark.slow
def test_privacy_benchmark_smoke_writes_every_key(tmp_path):
    out = tmp_path / "privacy.json"
    proc = subprocess.run(
        [
            sys.executable,
            "benchmarks/privacy.py",
            "--smoke",
            "--threads",
            "1",
            "--no-model-attacks",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "model attacks" in proc.stdout and "keys missing" in proc.stdout
    doc = json.loads(out.read_text())
    missing = [k for k in KEYS if k not in doc["ratios"]]
    assert not missing, f"missing {missing}; present {sorted(doc['ratios'])}"
    assert all(math.isfinite(float(doc["ratios"][k])) for k in KEYS)
    assert [p["variant"] for p in doc["frontier"]] == ["paper", "amplitude_noise", "private_phase"]
    for point in doc["frontier"]:
        assert all(math.isfinite(float(point[k])) for k in POINT_KEYS), point["label"]
    # the unprotected reference row: linkage of plaintext against itself is certain
    ref = next(r for r in doc["rows"] if r["method"] == "unprotected crops")
    assert ref["link_top1_spectral_N100"] == 1.0
