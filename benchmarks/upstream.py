"""Benchmark of the upstream (enhance) stage on the demo sites: does a network trained without clean images, by
each site alone, by all sites pooled, or federally (FedAvg), beat the tuned classical chain?

Data: ``build_demo_sites`` with the default sites A, B, C (parallel / fan-curved / fan-flat, different views and
doses) plus an **unseen** site D (a variation of A: half the photons, another start angle) that no network is
trained on. Each site's last scan is held out for testing; the others are its training and validation scans. Every
arm is scored on the held-out scans against the demo's ground truth (HU), PSNR (peak = the truth's range) and SSIM
(scikit-image, per slice, averaged), and reported as the mean over seeds with a 95 % t-interval; differences are
paired (same seed, same site).

Arms:

* ``fbp-hann``: FBP, Hann filter at full cutoff, untuned: the networks' input;
* ``fbp``: FBP with the filter and cutoff chosen per site on its validation scans (Hann, Shepp–Logan, cosine,
  ram-lak × cutoff 1 / 0.7 / 0.5);
* ``classical``: fedscan's view-similarity denoiser (the pipeline's config, threshold 1 or 2 chosen per site on
  validation scans) + FBP with the filter chosen the same way;
* ``local``: each site's own network (Noise2Inverse, K = 2 interleaved view splits of its training scans),
  ``steps`` steps; on the unseen site the best of the three local networks is reported;
* ``pooled``: one network on every site's pairs together (the upper bound nobody may train), ``3 × steps`` steps;
* ``pooled-thinning``: the same on the supervised target (binomial thinning, f = 0.5, kept → remaining photons);
* ``pooled-splitavg``: the pooled network averaged over the two split reconstructions instead of applied to the
  full reconstruction (Noise2Inverse's own inference);
* ``fedavg``: **in-process** FedAvg (not Flower): ``rounds`` rounds, each site runs ``steps / rounds`` local steps
  from the global weights with :func:`tasks.enhance.fit.fit_enhance`, the server averages weighted by examples.
  A site whose loss diverges is rejected and named; the run fails if every site diverges.

Networks apply to the full Hann FBP (cutoff 1) of a held-out scan, the input the training pairs were made from.
Ratio keys (issue 22): ``psnr_fed_minus_pooled_db``, ``psnr_fed_minus_best_local_db`` (mean over seen sites of
FedAvg minus the site's own network; ``_min`` the worst site; ``_unseen`` against the best local network),
``psnr_fed_minus_classical_db`` (and ``_unseen``), ``psnr_selfsup_minus_supervised_db`` (pooled Noise2Inverse
minus pooled thinning), ``enhance_time_vs_fbp`` (network on ``--time-size``² slices, batch 8, over FBP of the same
slices with site A's geometry at that size), ``train_bytes_per_round`` (float32 weights down and up, all sites).
Through the Flower apps (:func:`flower_arms`, ``--no-flower`` skips them): ``flower-fedavg``, ``flower-fedprox``,
``flower-silobn`` (BatchNorm statistics kept at the sites), ``flower-secagg``; keys
``psnr_flower_fedavg_minus_inprocess_db``, ``psnr_fedprox_minus_fedavg_db``, ``psnr_silobn_minus_fedavg_db``,
``psnr_silobn_minus_pooled_db``, ``secagg_round_time_ratio`` (SecAgg+ over plain FedAvg, seconds per round,
in-process: no network), ``flower_bytes_up_per_round`` (serialized replies, all sites).

Torch runs on one thread by default (``--threads``): on the shared 2-core VM a training step of the quick network
took ~1.2 s on 2 threads under load and ~15 ms on one (OpenMP threads waiting on each other).

Usage::

    python benchmarks/upstream.py --quick --json out.json      # 32² slices, 2 seeds
    python benchmarks/upstream.py --seeds 3 --size 64            # the full run
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import parse_args, print_table, write_json

FILTERS = ("hann", "shepp-logan", "cosine", "ram-lak")
CUTOFFS = (1.0, 0.7, 0.5)
THRESHOLDS = (1.0, 2.0)
SEEN = 3  # sites A, B, C train; site D (index 3) is unseen


@dataclass(frozen=True)
class ScanData:
    site_id: str
    scan_id: str
    geometry: Any
    projections: np.ndarray  # (views, rows, cols) line integrals
    truth_hu: np.ndarray  # (slices, ny, nx)
    water: float
    i0: float


@dataclass(frozen=True)
class Plan:
    size: int
    n_slices: int
    scans_per_site: int
    seeds: int
    steps: int
    rounds: int
    channels: int
    time_size: int
    flower: bool = True


def plan_for(args: argparse.Namespace) -> Plan:
    quick = Plan(size=32, n_slices=4, scans_per_site=2, seeds=2, steps=60, rounds=2, channels=8, time_size=128)
    full = Plan(size=64, n_slices=6, scans_per_site=3, seeds=3, steps=240, rounds=4, channels=16, time_size=512)
    plan = quick if args.quick else full
    overrides = {k: getattr(args, k) for k in ("size", "seeds", "steps", "rounds", "time_size") if getattr(args, k)}
    return replace(plan, **overrides, flower=not args.no_flower)


def load_scans(path: Path) -> list[ScanData]:
    from tasks.storage import SiteStore

    site = SiteStore.open(path, mode="r")
    out = []
    for scan in site.scans():
        m = scan.manifest
        truth = np.asarray(scan.array("volume_truth")[...], dtype=np.float32)
        out.append(
            ScanData(
                site_id=site.site_id,
                scan_id=scan.scan_id,
                geometry=m.geometry,
                projections=np.asarray(scan.array("projections")[...], dtype=np.float32),
                truth_hu=(truth - m.water_attenuation_per_mm) / m.water_attenuation_per_mm * 1000.0,
                water=m.water_attenuation_per_mm,
                i0=float(m.i0_photons or 0.0),
            )
        )
    return out


def fbp_hu(projections: np.ndarray, scan: ScanData, *, filter_name: str = "hann", cutoff: float = 1.0) -> np.ndarray:
    import torch

    from tasks.reconstruct.kernels import attenuation_to_hu, fbp

    sino = np.ascontiguousarray(projections.transpose(1, 0, 2))
    img = np.asarray(
        fbp(sino, scan.geometry, filter_name=filter_name, frequency_cutoff=cutoff, device=torch.device("cpu"))  # type: ignore[arg-type]
    )
    return np.asarray(attenuation_to_hu(img, water_attenuation_per_mm=scan.water), dtype=np.float32)


def classical_projections(scan: ScanData, threshold: float) -> np.ndarray:
    import dask.array as da

    from schemas.pipeline import PipelineConfig
    from tasks.denoise.chunked import denoise_dask

    base = PipelineConfig.from_yaml(Path(__file__).resolve().parents[1] / "configs" / "pipeline.yaml").denoise
    config = base.model_copy(update={"threshold_value": threshold})
    lazy, _ = denoise_dask(da.from_array(scan.projections), config=config, geometry=scan.geometry, i0_photons=scan.i0)
    return np.asarray(lazy.compute(scheduler="synchronous"), dtype=np.float32)


def score(estimate: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    data_range = float(truth.max() - truth.min())
    psnr = float(peak_signal_noise_ratio(truth, estimate, data_range=data_range))
    ssim = float(
        np.mean([structural_similarity(t, e, data_range=data_range) for t, e in zip(truth, estimate, strict=True)])
    )
    return psnr, ssim


def mean_score(images: list[np.ndarray], scans: list[ScanData]) -> tuple[float, float]:
    scores = [score(img, s.truth_hu) for img, s in zip(images, scans, strict=True)]
    return float(np.mean([p for p, _ in scores])), float(np.mean([q for _, q in scores]))


def tuned_fbp(val: list[ScanData], projections_of: Any) -> tuple[str, float]:
    """The (filter, cutoff) with the best mean validation PSNR."""
    best, best_psnr = ("hann", 1.0), -math.inf
    for f in FILTERS:
        for c in CUTOFFS:
            psnr = mean_score([fbp_hu(projections_of(s), s, filter_name=f, cutoff=c) for s in val], val)[0]
            if psnr > best_psnr:
                best, best_psnr = (f, c), psnr
    return best


def apply_net(state: dict[str, Any], arch: Any, images: np.ndarray) -> np.ndarray:
    import torch

    from tasks.enhance.model import ResidualUNet, enhance_slices

    model = ResidualUNet(arch)
    model.load_state_dict(state)
    return enhance_slices(model, images, batch_size=8, device=torch.device("cpu"))


def t95(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % t-interval (NaN for one value)."""
    from scipy import stats

    arr = np.asarray(values, dtype=np.float64)
    if arr.size < 2:
        return float(arr.mean()), math.nan
    half = float(stats.t.ppf(0.975, arr.size - 1) * arr.std(ddof=1) / math.sqrt(arr.size))
    return float(arr.mean()), half


def run_seed(plan: Plan, seed: int, workdir: Path) -> tuple[dict[tuple[str, str], tuple[float, float]], dict[str, Any]]:
    import torch

    from schemas.demo import default_sites
    from tasks.demo.build import build_demo_sites
    from tasks.enhance.fit import FitConfig, fedavg_in_process, site_pairs
    from tasks.enhance.model import Architecture, build_model
    from tasks.enhance.training import TrainSettings, train_enhance
    from tasks.storage import SiteStore

    profiles = default_sites(SEEN + 1)
    stores = build_demo_sites(
        workdir,
        profiles=profiles,
        scans_per_site=plan.scans_per_site,
        n_slices=plan.n_slices,
        seed=seed,
        size=plan.size,
        keep_counts=True,
    )
    sites = [load_scans(p) for p in stores]
    arch = Architecture(channels=plan.channels, depth=2)
    settings = TrainSettings(steps=plan.steps, batch_size=8, learning_rate=1e-3)
    config = FitConfig(arch=arch, settings=settings, seed=seed)
    results: dict[tuple[str, str], tuple[float, float]] = {}
    info: dict[str, Any] = {}

    # ---- baselines, tuned per site on its validation (= training) scans
    inputs: dict[str, list[np.ndarray]] = {}
    for scans in sites:
        site_id, val, test = scans[0].site_id, scans[:-1], scans[-1:]
        f, c = tuned_fbp(val, lambda s: s.projections)
        results[(site_id, "fbp")] = mean_score([fbp_hu(s.projections, s, filter_name=f, cutoff=c) for s in test], test)
        info[f"{site_id}_fbp_filter"] = f"{f}@{c}"
        best = (-math.inf, (0.0, 0.0), "")
        for thr in THRESHOLDS:
            den_val = {s.scan_id: classical_projections(s, thr) for s in val}
            fc, cc = tuned_fbp(val, lambda s, d=den_val: d[s.scan_id])
            val_psnr = mean_score([fbp_hu(den_val[s.scan_id], s, filter_name=fc, cutoff=cc) for s in val], val)[0]
            if val_psnr > best[0]:
                test_imgs = [fbp_hu(classical_projections(s, thr), s, filter_name=fc, cutoff=cc) for s in test]
                best = (val_psnr, mean_score(test_imgs, test), f"thr={thr} {fc}@{cc}")
        results[(site_id, "classical")] = best[1]
        info[f"{site_id}_classical"] = best[2]
        inputs[site_id] = [fbp_hu(s.projections, s) for s in test]  # the networks' input: Hann FBP
        results[(site_id, "fbp-hann")] = mean_score(inputs[site_id], test)

    def score_net(state: dict[str, Any], arm: str, site_ids: list[str]) -> None:
        for scans in sites:
            if scans[0].site_id in site_ids:
                test = scans[-1:]
                out = [apply_net(state, arch, x) for x in inputs[scans[0].site_id]]
                results[(scans[0].site_id, arm)] = mean_score(out, test)

    seen_stores = stores[:SEEN]
    seen_ids = [s[0].site_id for s in sites[:SEEN]]
    all_ids = [s[0].site_id for s in sites]
    train_ids = [[s.scan_id for s in scans[:-1]] for scans in sites[:SEEN]]
    t0 = time.perf_counter()
    n2i = [
        site_pairs(SiteStore.open(p, mode="r"), replace(config, scan_ids=ids))
        for p, ids in zip(seen_stores, train_ids, strict=True)
    ]
    thin = [
        site_pairs(SiteStore.open(p, mode="r"), replace(config, target="thinning", scan_ids=ids))
        for p, ids in zip(seen_stores, train_ids, strict=True)
    ]
    info["pairs_seconds"] = time.perf_counter() - t0

    # ---- local networks
    from tasks.enhance.fit import fit_enhance

    t0 = time.perf_counter()
    local_states = []
    for path, pairs in zip(seen_stores, n2i, strict=True):
        state, _ = fit_enhance(SiteStore.open(path, mode="r"), None, config, pairs=pairs)
        local_states.append(state)
    for sid, state in zip(seen_ids, local_states, strict=True):
        score_net(state, "local", [sid])
    unseen = all_ids[SEEN]
    per_local = []
    for state in local_states:
        score_net(state, "local-candidate", [unseen])
        per_local.append(results.pop((unseen, "local-candidate")))
    results[(unseen, "local")] = max(per_local)  # the best local network on the unseen site
    info["local_seconds"] = time.perf_counter() - t0

    # ---- pooled (Noise2Inverse and thinning) and the split-averaged inference
    def pooled(pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
        model = build_model(arch, generator=torch.Generator().manual_seed(seed))
        x = np.concatenate([p[0] for p in pairs])
        y = np.concatenate([p[1] for p in pairs])
        pooled_settings = replace(settings, steps=plan.steps * SEEN)
        gen = torch.Generator().manual_seed(seed)
        return train_enhance(
            model, x, y, settings=pooled_settings, generator=gen, device=torch.device("cpu")
        ).state_dict

    t0 = time.perf_counter()
    pooled_state = pooled(n2i)
    score_net(pooled_state, "pooled", all_ids)
    score_net(pooled(thin), "pooled-thinning", all_ids)
    info["pooled_seconds"] = time.perf_counter() - t0
    from tasks.enhance.pairs import reconstruct_splits

    for scans in sites:
        test = scans[-1:]
        outs = []
        for s in test:
            splits = reconstruct_splits(
                s.projections, s.geometry, k=2, water_attenuation_per_mm=s.water, device=torch.device("cpu")
            )
            outs.append(np.mean([apply_net(pooled_state, arch, sp) for sp in splits], axis=0))
        results[(scans[0].site_id, "pooled-splitavg")] = mean_score(outs, test)

    # ---- FedAvg (in-process, over fit_enhance)
    t0 = time.perf_counter()
    fed_config = replace(config, settings=replace(settings, steps=max(1, plan.steps // plan.rounds)))
    fed = fedavg_in_process(
        [SiteStore.open(p, mode="r") for p in seen_stores], fed_config, rounds=plan.rounds, pairs=n2i
    )
    fed_state, rejected = fed.state, fed.rejected
    score_net(fed_state, "fedavg", all_ids)
    info["fedavg_seconds"] = time.perf_counter() - t0
    info["fedavg_rejected"] = rejected
    n_params = sum(int(v.numel()) for v in fed_state.values())
    info["train_bytes_per_round"] = 2 * SEEN * 4 * n_params
    if plan.flower:
        info.update(flower_arms(plan, seed, workdir, sites, inputs, results, n_train=min(len(p[0]) for p in n2i)))
    return results, info


#: The arms run through the Flower apps (in-process Grid), each a FederationConfig over the plain FedAvg one.
FLOWER_ARMS: dict[str, dict[str, Any]] = {
    "flower-fedavg": {},
    "flower-fedprox": {"strategy": "fedprox", "proximal_mu": 0.01},
    "flower-silobn": {"enhance_batchnorm": True, "local_bn_statistics": True},
    "flower-secagg": {"secagg": True},
}


def flower_arms(
    plan: Plan,
    seed: int,
    workdir: Path,
    sites: list[list[ScanData]],
    inputs: dict[str, list[np.ndarray]],
    results: dict[tuple[str, str], tuple[float, float]],
    *,
    n_train: int,
) -> dict[str, Any]:
    """FedAvg, FedProx, FedAvg + SiloBN (BatchNorm statistics kept at the sites; the scored site re-estimates them
    on its own input, the policy for the unseen site too) and SecAgg+ through the ServerApp/ClientApp
    (:func:`tasks.federated.inprocess.run_in_process`: real messages, strategies, mods; no processes). Clients
    read stores holding only the training scans (the same bytes: demo scans are seeded per scan) and hold out one
    slice per scan; ``local_epochs`` is chosen so that a round is about ``steps / rounds`` steps."""
    import torch

    from schemas.demo import default_sites
    from schemas.federation import FederationConfig
    from tasks.demo.build import build_demo_sites
    from tasks.enhance.model import enhance_slices, load_checkpoint
    from tasks.federated.enhance_task import ENHANCE_CHECKPOINT
    from tasks.federated.inprocess import run_in_process

    train_only = build_demo_sites(
        workdir / "train-only",
        profiles=default_sites(SEEN + 1)[:SEEN],
        scans_per_site=plan.scans_per_site - 1,
        n_slices=plan.n_slices,
        seed=seed,
        size=plan.size,
        keep_counts=True,
    )
    steps_per_round = max(1, plan.steps // plan.rounds)
    base: dict[str, Any] = {
        "task": "enhance",
        "num_rounds": plan.rounds,
        "local_epochs": max(1, round(steps_per_round * 8 / n_train)),
        "batch_size": 8,
        "learning_rate": 1e-3,
        "base_channels": plan.channels,
        "min_available_clients": SEEN,
        "round_timeout_s": 3600,
        "wait_for_nodes_s": 5,
        "holdout_fraction": 0.01,
        "seed": seed,
        "enhance_grid_ny_px": plan.size,
        "enhance_grid_nx_px": plan.size,
    }
    cpu = torch.device("cpu")
    info: dict[str, Any] = {"flower_local_epochs": base["local_epochs"]}
    for arm, extra in FLOWER_ARMS.items():
        cfg = FederationConfig.model_validate({**base, **extra})
        _, records = run_in_process(cfg, train_only, workdir / arm)
        info[f"{arm}_seconds_per_round"] = float(np.mean([r.seconds for r in records]))
        info[f"{arm}_bytes_up_per_round"] = float(np.mean([r.bytes_up for r in records]))
        checkpoint = load_checkpoint(Path(str(records[-1].model_dir)) / ENHANCE_CHECKPOINT)
        for scans in sites:
            sid, test = scans[0].site_id, scans[-1:]
            outs = []
            for x in inputs[sid]:
                c = checkpoint.with_statistics_from(x, device=cpu) if checkpoint.site_local_statistics else checkpoint
                outs.append(enhance_slices(c.model(device=cpu), x, batch_size=8, device=cpu))
            results[(sid, arm)] = mean_score(outs, test)
    info["secagg_round_time_ratio"] = info["flower-secagg_seconds_per_round"] / info["flower-fedavg_seconds_per_round"]
    return info


def time_ratio(plan: Plan) -> dict[str, float]:
    """Seconds per slice of the network and of FBP at ``time_size``² with site A's geometry, batch of 8 slices."""
    import torch

    from benchmarks._common import best_time
    from schemas.demo import default_sites
    from tasks.enhance.model import Architecture, build_model, enhance_slices
    from tasks.reconstruct.kernels import fbp

    profile = default_sites(1)[0]
    grid = profile.grid(plan.time_size)
    g = profile.geometry(grid, n_slices=8)
    rng = np.random.default_rng(0)
    sino = rng.random((8, g.n_views, g.n_detector_cols), dtype=np.float32) * 0.1
    cpu = torch.device("cpu")
    fbp_s, _ = best_time(lambda: fbp(sino, g, filter_name="hann", device=cpu), repeat=2)
    model = build_model(Architecture(channels=plan.channels, depth=2), generator=torch.Generator().manual_seed(0))
    slices = rng.normal(0, 100, (8, plan.time_size, plan.time_size)).astype(np.float32)
    net_s, _ = best_time(lambda: enhance_slices(model, slices, batch_size=8, device=cpu), repeat=2)
    return {"fbp_s_per_slice": fbp_s / 8, "enhance_s_per_slice": net_s / 8, "enhance_time_vs_fbp": net_s / fbp_s}


def main() -> None:
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--seeds", type=int, help="seeds (demo data and training), default 2 quick / 3")
    extra.add_argument("--size", type=int, help="grid side, pixels (default 32 quick / 64)")
    extra.add_argument("--steps", type=int, help="local training steps per site (default 60 quick / 240)")
    extra.add_argument("--rounds", type=int, help="FedAvg rounds (default 2 quick / 4)")
    extra.add_argument("--time-size", type=int, help="slice side of the timing ratio (default 128 quick / 512)")
    extra.add_argument("--threads", type=int, default=1, help="torch threads (default 1: see the module docstring)")
    extra.add_argument("--no-flower", action="store_true", help="skip the arms through the Flower apps")
    args = parse_args((__doc__ or "").splitlines()[0], parents=[extra])
    plan = plan_for(args)
    import torch

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    per_seed: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    infos = []
    for seed in range(plan.seeds):
        with tempfile.TemporaryDirectory(prefix="fedscan-upstream-") as tmp:
            results, info = run_seed(plan, seed, Path(tmp))
        for key, value in results.items():
            per_seed[key].append(value)
        infos.append(info)
    sites = sorted({site for site, _ in per_seed})
    arms = ["fbp-hann", "fbp", "classical", "local", "pooled", "pooled-splitavg", "pooled-thinning", "fedavg"]
    arms += list(FLOWER_ARMS) if plan.flower else []
    rows: list[dict[str, Any]] = []
    for site in sites:
        for arm in arms:
            values = per_seed.get((site, arm))
            if not values:
                continue
            pm, ph = t95([v[0] for v in values])
            sm, sh = t95([v[1] for v in values])
            rows.append(
                {
                    "site": site + (" (unseen)" if site == sites[SEEN] else ""),
                    "arm": arm,
                    "psnr_db": round(pm, 2),
                    "psnr_ci95": round(ph, 2),
                    "ssim": round(sm, 4),
                    "ssim_ci95": round(sh, 4),
                    "seeds": len(values),
                }
            )

    def paired(a: str, b: str, site: str) -> list[float]:
        return [x[0] - y[0] for x, y in zip(per_seed[(site, a)], per_seed[(site, b)], strict=True)]

    seen, unseen = sites[:SEEN], sites[SEEN]

    def mean_over_seen(a: str, b: str) -> list[float]:
        return [float(np.mean(col)) for col in zip(*(paired(a, b, s) for s in seen), strict=True)]

    ratios: dict[str, float] = {}
    diffs: dict[str, Any] = {}
    for name, (a, b) in {
        "psnr_fed_minus_pooled_db": ("fedavg", "pooled"),
        "psnr_fed_minus_best_local_db": ("fedavg", "local"),
        "psnr_fed_minus_classical_db": ("fedavg", "classical"),
        "psnr_selfsup_minus_supervised_db": ("pooled", "pooled-thinning"),
        "psnr_pooled_minus_fbp_db": ("pooled", "fbp"),
        "psnr_pooled_minus_its_input_db": ("pooled", "fbp-hann"),
        **(
            {
                "psnr_flower_fedavg_minus_inprocess_db": ("flower-fedavg", "fedavg"),
                "psnr_fedprox_minus_fedavg_db": ("flower-fedprox", "flower-fedavg"),
                "psnr_silobn_minus_fedavg_db": ("flower-silobn", "flower-fedavg"),
                "psnr_silobn_minus_pooled_db": ("flower-silobn", "pooled"),
            }
            if plan.flower
            else {}
        ),
    }.items():
        m, h = t95(mean_over_seen(a, b))
        ratios[name] = round(m, 3)
        diffs[name] = {"mean_over_seen_sites": m, "ci95": h}
        for s in sites:
            sm, sh = t95(paired(a, b, s))
            diffs[name][s] = {"mean": sm, "ci95": sh}
    ratios["psnr_fed_minus_best_local_db_min"] = round(
        min(diffs["psnr_fed_minus_best_local_db"][s]["mean"] for s in seen), 3
    )
    ratios["psnr_fed_minus_best_local_db_unseen"] = round(diffs["psnr_fed_minus_best_local_db"][unseen]["mean"], 3)
    ratios["psnr_fed_minus_classical_db_unseen"] = round(diffs["psnr_fed_minus_classical_db"][unseen]["mean"], 3)
    timing = time_ratio(plan)
    ratios["enhance_time_vs_fbp"] = round(timing["enhance_time_vs_fbp"], 3)
    ratios["train_bytes_per_round"] = float(infos[0]["train_bytes_per_round"])
    if plan.flower:
        ratios["secagg_round_time_ratio"] = round(float(np.mean([i["secagg_round_time_ratio"] for i in infos])), 3)
        ratios["flower_bytes_up_per_round"] = float(infos[0]["flower-fedavg_bytes_up_per_round"])
    print_table(rows, ratios)
    print(f"timing at {plan.time_size}^2: {timing}")
    print(f"total {time.perf_counter() - t_start:.0f} s; plan {plan}")
    write_json(
        args.json,
        rows,
        ratios,
        paired_differences=diffs,
        timing=timing,
        plan=plan.__dict__,
        per_seed=infos,
        seconds=time.perf_counter() - t_start,
    )


if __name__ == "__main__":
    main()
