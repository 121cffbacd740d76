"""Federated training benchmark: single sites vs pooled vs FedAvg / FedProx / FedBN, SecAgg+, DP, compression.

Sites are demo sites (``schemas.demo.default_sites``) rendered noise-free on a small grid, with lesions made
larger and stronger than the demo defaults so a small CNN can see them at this resolution, and surrogates from
the stand-in (:func:`tasks.federated.data.stand_in_surrogate`) until the FESF stage's chunked driver exists.
Federated runs use :func:`tasks.federated.inprocess.run_in_process` (Flower's messages, strategies, mods and
SecAgg+ workflow, no processes), so wall times are algorithm + crypto, not transport. Every global model is
scored on the pooled held-out slices of all sites (AUC by Mann–Whitney); FedBN has no single global model and
reports the sites' own held-out AUC (weighted mean).

    python benchmarks/federated.py --quick --json out.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from schemas.demo import default_sites
from schemas.federation import FederationConfig
from tasks.demo.generate import generate_scan
from tasks.federated.data import SiteData, load_site_data, split_holdout, stand_in_surrogate, write_site_surrogates
from tasks.federated.inprocess import run_in_process
from tasks.federated.model import build_model, set_arrays
from tasks.federated.training import evaluate, train_local

CPU = torch.device("cpu")


def build_sites(root: Path, *, n_sites: int, n_scans: int, n_slices: int, grid: int, seed: int) -> list[Path]:
    stores = []
    for k, profile in enumerate(default_sites(n_sites)):
        hi = profile.lesion_contrast_hu[1]
        sign = 1.0 if hi > 0 else -1.0
        p = profile.model_copy(
            update={
                "lesion_radius_mm": (14.0, 24.0),
                "lesion_contrast_hu": tuple(sorted((sign * 150.0, sign * 300.0))),
                "lesion_prevalence_fraction": 0.5,
            }
        )
        scans = []
        for j in range(n_scans):
            s = generate_scan(
                p, n_slices=n_slices, grid=p.grid(grid), rng=np.random.default_rng([seed, k, j]), noise=False
            )
            hu = (s.volume_truth / p.water_attenuation_per_mm - 1.0) * 1000.0
            scans.append((f"scan-{j}", stand_in_surrogate(hu, site_id=p.site_id), s.labels, s.masks))
        path = root / f"{p.site_id}.zarr"
        write_site_surrogates(path, site_id=p.site_id, scans=scans)
        stores.append(path)
    return stores


def pooled_test(splits: list[tuple[SiteData, SiteData]]) -> tuple[np.ndarray, np.ndarray]:
    return (np.concatenate([h.images for _, h in splits]), np.concatenate([h.targets for _, h in splits]))


def centralised_auc(train: list[SiteData], test: tuple[np.ndarray, np.ndarray], cfg: FederationConfig) -> float:
    x = np.concatenate([t.images for t in train])
    y = np.concatenate([t.targets for t in train])
    model = build_model("classify", base_channels=cfg.base_channels, seed=cfg.seed)
    train_local(
        model,
        x,
        y,
        task="classify",
        epochs=cfg.num_rounds * cfg.local_epochs,
        learning_rate=cfg.learning_rate,
        batch_size=cfg.batch_size,
        generator=torch.Generator().manual_seed(cfg.seed),
        device=CPU,
    )
    return evaluate(model, *test, task="classify", batch_size=64, device=CPU)["auc"]


def model_auc(model_dir: str, test: tuple[np.ndarray, np.ndarray], cfg: FederationConfig) -> float:
    model = build_model("classify", base_channels=cfg.base_channels, seed=cfg.seed)
    set_arrays(model, {k: v.numpy() for k, v in torch.load(Path(model_dir) / "model.pt").items()})
    return evaluate(model, *test, task="classify", batch_size=64, device=CPU)["auc"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 sites, few scans and rounds")
    ap.add_argument("--json", type=Path, help="write rows and ratios here")
    ap.add_argument("--sites", type=int, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    n_sites = args.sites or 3
    sizes = dict(n_scans=4, n_slices=12, grid=32) if args.quick else dict(n_scans=8, n_slices=16, grid=64)
    rounds = 4 if args.quick else 10
    base = FederationConfig(
        num_rounds=rounds,
        local_epochs=2,
        learning_rate=5e-3,
        batch_size=8,
        base_channels=8,
        min_available_clients=2,
        seed=0,
    )
    root = Path(tempfile.mkdtemp(prefix="fedscan-bench-"))
    try:
        t0 = time.perf_counter()
        stores = build_sites(root / "sites", n_sites=n_sites, seed=0, **sizes)
        splits = [
            split_holdout(load_site_data(s, task="classify"), fraction=base.holdout_fraction, seed=base.seed)
            for s in stores
        ]
        test = pooled_test(splits)
        rows: list[dict[str, object]] = []
        print(f"built {n_sites} sites in {time.perf_counter() - t0:.1f} s; pooled test: {test[0].shape[0]} slices")
        for tr, _ in splits:
            rows.append(
                {"case": "single-site", "method": f"site {tr.site_id} alone", "auc": centralised_auc([tr], test, base)}
            )
        rows.append(
            {
                "case": "pooled",
                "method": "centralised on pooled surrogates",
                "auc": centralised_auc([t for t, _ in splits], test, base),
            }
        )
        runs = {
            "fedavg": {},
            "fedprox": {"strategy": "fedprox", "proximal_mu": 0.01},
            "fedbn": {"fedbn": True},
            "fedavg+secagg": {"secagg": True},
            "fedavg+dp-server": {"dp_mode": "server", "dp_clipping_norm": 5.0, "dp_noise_multiplier": 0.01},
            "fedavg+secagg+dp-client": {
                "secagg": True,
                "dp_mode": "client",
                "dp_clipping_norm": 5.0,
                "dp_noise_multiplier": 0.01,
            },
            "fedavg+float16": {"compression": "float16"},
            "fedavg+topk10": {"compression": "topk", "topk_fraction": 0.1},
        }
        for name, kw in runs.items():
            cfg = FederationConfig.model_validate({**base.model_dump(), **kw})
            t = time.perf_counter()
            _, recs = run_in_process(cfg, stores, root / name)
            train = [r for r in recs if r.phase == "train"]
            final = next((r.model_dir for r in reversed(train) if r.model_dir), None)
            auc = (train[-1].eval_auc if cfg.fedbn else model_auc(final, test, cfg)) if final else float("nan")
            rows.append(
                {
                    "case": "federated",
                    "method": name,
                    "auc": auc,
                    "round_s": float(np.mean([r.seconds for r in train[1:]] or [r.seconds for r in train])),
                    "bytes_up_per_round": float(np.mean([r.bytes_up for r in train])),
                    "bytes_down_per_round": float(np.mean([r.bytes_down for r in train])),
                    "rounds_aggregated": sum(r.aggregated for r in train),
                    "wall_s": time.perf_counter() - t,
                }
            )
        by = {r["method"]: r for r in rows}
        singles = [float(r["auc"]) for r in rows if r["case"] == "single-site"]
        ratios = {
            "auc_fedavg_minus_pooled": float(by["fedavg"]["auc"])
            - float(by["centralised on pooled surrogates"]["auc"]),
            "auc_fedavg_minus_best_single_site": float(by["fedavg"]["auc"]) - max(singles),
            "secagg_round_time_ratio": float(by["fedavg+secagg"]["round_s"]) / float(by["fedavg"]["round_s"]),
            "compression_bytes_ratio": float(by["fedavg"]["bytes_up_per_round"])
            / float(by["fedavg+float16"]["bytes_up_per_round"]),
            "compression_topk_bytes_ratio": float(by["fedavg"]["bytes_up_per_round"])
            / float(by["fedavg+topk10"]["bytes_up_per_round"]),
            "auc_float16_minus_fedavg": float(by["fedavg+float16"]["auc"]) - float(by["fedavg"]["auc"]),
            "auc_topk10_minus_fedavg": float(by["fedavg+topk10"]["auc"]) - float(by["fedavg"]["auc"]),
        }
        print(f"\n{'case':<12} {'method':<34} {'AUC':>6} {'round s':>8} {'up B/round':>11} {'aggregated':>10}")
        for r in rows:
            print(
                f"{r['case']:<12} {r['method']:<34} {float(r['auc']):6.3f} "
                f"{float(r.get('round_s', float('nan'))):8.2f} {float(r.get('bytes_up_per_round', float('nan'))):11.0f}"
                f" {r.get('rounds_aggregated', '')!s:>10}"
            )
        print()
        for k, v in ratios.items():
            print(f"{k:<36} {v:+.3f}")
        if args.json:
            args.json.write_text(json.dumps({"rows": rows, "ratios": ratios}, indent=2), encoding="utf-8")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
