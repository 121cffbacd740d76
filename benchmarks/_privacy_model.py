"""The model side of the privacy benchmark: SecAgg+/DP cost, membership inference, update inversion.

What SecAgg+ and DP cost on the default configuration, membership inference against the federated diagnostic
model, and gradient inversion of a single-site update.

``run(quick)`` returns flat float keys (and a few nested tables) that ``benchmarks/privacy.py`` merges into its
JSON; standalone (the figures under ``ratios``, strict JSON: NaN as null)::

    python -m benchmarks._privacy_model --quick --json out.json

Data and training are those of ``benchmarks/federated.py`` (demo sites, 32² lesion crops hidden by FESF with one
host per site, FedAvg in-process through Flower's messages, mods and SecAgg+ workflow), on fedscan's default
configuration: local BatchNorm statistics (SiloBN). Arms: the default, SecAgg+, and server-side fixed-clipping DP
at each noise multiplier σ of ``DP_SIGMAS`` (ε at δ = 1e-5 by :func:`tasks.federated.privacy.gaussian_dp_epsilon`,
site-level, no amplification by sampling; site-level DP bounds any one slice's influence by the same ε). AUC on
the pooled held-out and test-only crops of every site (each scored by its site's model); privacy arms minus the
default, with a paired bootstrap interval over the test crops. Why site-level DP costs so much here: with ``m``
sites the noise on the mean update has L2 norm about ``σ·C·√d/m`` against a signal of at most ``C``; with
``d`` ≈ 15k shared weights and ``m = 3`` that is a signal-to-noise ratio of about ``3/(123·σ)``, so an ε in the
tens (σ ≈ 1) drowns the update whatever the clipping norm; it needs hundreds of sites per round at this size.

Membership (members: a site's training crops; non-members: its held-out and test-only crops, same distribution,
never trained on): the loss-threshold attack on each site's model, and a shadow-model attack whose shadows are
trained centrally, for as many epochs as a federated client trains in total, on other demo patients of the same
sites hidden the same way (the attacker is granted data of the target's distribution). ``membership_auc`` is the
stronger of the two.

Inversion: the server's strongest case, one site sending the gradient of one crop (one step, batch 1, FedSGD)
of the initial diagnostic model, SecAgg+ off; the attack (:func:`tasks.privacy.inversion.invert_gradient`)
rebuilds a crop that is compared with the site's surrogate (what it trained on) and with the private plaintext
crop behind it; ``surrogate_psnr_vs_plaintext_db`` is the ceiling of any attack that recovers the surrogate.
With SecAgg+ on, ``secagg_individual_updates_seen`` counts the train replies in which the server received model
arrays (0: it only gets masked vectors, whose sum it unmasks).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import parse_args, write_json
from benchmarks.federated import _federated_row, build_sites, extend_holdout, pooled_test
from schemas.federation import FederationConfig
from tasks.federated.data import SiteData, load_site_data, split_holdout
from tasks.federated.model import build_model, set_arrays
from tasks.federated.training import (
    bootstrap_aucs,
    bootstrap_indices,
    percentile_ci,
    recalibrate_batchnorm,
    train_local,
)
from tasks.privacy.inversion import image_quality, invert_gradient, slice_gradient
from tasks.privacy.membership import ShadowAttack, attack_features, loss_attack_auc, slice_losses

CPU = torch.device("cpu")
DP_DELTA = 1e-5
#: Noise multipliers of the DP arms (quick, full): near-free (ε in the tens of thousands) to ε ≈ 16 at σ = 1.
DP_SIGMAS = {True: (0.01, 1.0), False: (0.01, 0.1, 1.0)}
DP_CLIPPING_NORM = 5.0


def _sizes(quick: bool) -> dict[str, Any]:
    if quick:
        return {"n_scans": 6, "n_slices": 12, "grid": 128, "crop": 32, "crops_per_slice": 3}
    return {"n_scans": 8, "n_slices": 16, "grid": 128, "crop": 32, "crops_per_slice": 3}


def site_models(grid: Any, model_dir: str, splits: list[tuple[SiteData, SiteData]], cfg: FederationConfig) -> list[Any]:
    """Each site's model as it evaluates: the final global arrays with the site's own BatchNorm statistics."""
    from tasks.federated.client_app import _LOCAL_MODEL

    shared = {k: v.numpy() for k, v in torch.load(Path(model_dir) / "model.pt").items()}
    models = []
    for (train, _), ctx in zip(splits, grid.contexts.values(), strict=True):
        model = build_model("classify", base_channels=cfg.base_channels, seed=cfg.seed)
        model.load_state_dict(ctx.state.array_records[_LOCAL_MODEL].to_torch_state_dict())
        set_arrays(model, shared)
        if cfg.local_bn_statistics:
            recalibrate_batchnorm(model, train.images, batch_size=cfg.batch_size, device=CPU)
        models.append(model)
    return models


def _losses(models: list[Any], splits: list[tuple[SiteData, SiteData]]) -> tuple[Any, Any, Any, Any]:
    """Members' and non-members' losses and labels, over all sites (each site's crops by its own model)."""
    li, lo, yi, yo = [], [], [], []
    for m, (tr, ho) in zip(models, splits, strict=True):
        li.append(slice_losses(m, tr.images, tr.targets, batch_size=64, device=CPU))
        lo.append(slice_losses(m, ho.images, ho.targets, batch_size=64, device=CPU))
        yi.append(tr.targets)
        yo.append(ho.targets)
    return np.concatenate(li), np.concatenate(lo), np.concatenate(yi), np.concatenate(yo)


def shadow_attack(
    root: Path, cfg: FederationConfig, *, n_shadows: int, n_sites: int, sizes: dict[str, Any]
) -> ShadowAttack:
    """The attack model, fitted on ``n_shadows`` shadow models trained centrally on other demo patients."""
    fin, fout = [], []
    for k in range(n_shadows):
        stores = build_sites(root / f"shadow-{k}", n_sites=n_sites, seed=1000 + k, surrogate="fesf", **sizes)
        splits = [split_holdout(load_site_data(s, task="classify"), fraction=0.5, seed=k) for s in stores]
        x = np.concatenate([t.images for t, _ in splits])
        y = np.concatenate([t.targets for t, _ in splits])
        model = build_model("classify", base_channels=cfg.base_channels, seed=100 + k)
        train_local(
            model,
            x,
            y,
            task="classify",
            epochs=cfg.num_rounds * cfg.local_epochs,
            learning_rate=cfg.learning_rate,
            batch_size=cfg.batch_size,
            generator=torch.Generator().manual_seed(100 + k),
            device=CPU,
        )
        li, lo, yi, yo = _losses([model] * len(splits), splits)
        fin.append(attack_features(li, yi))
        fout.append(attack_features(lo, yo))
    return ShadowAttack.fit(np.concatenate(fin), np.concatenate(fout))


def inversion(root: Path, cfg: FederationConfig, *, n_crops: int, iterations: int) -> dict[str, Any]:
    """Invert single-crop gradients of the initial model at site A; quality vs surrogate and vs plaintext.

    Two BatchNorm modes: ``train`` (batch statistics of the one crop, as a site's training step computes them)
    and ``eval`` (fixed statistics: the attacker's better case). The flat keys give the stronger of the two
    (higher SSIM against the surrogate); ``blank`` is a constant guess, the floor of recovering nothing."""
    sizes: dict[str, Any] = {"n_scans": 1, "n_slices": 4, "grid": 128, "crop": 32, "crops_per_slice": 2}
    fesf = load_site_data(
        build_sites(root / "inv-fesf", n_sites=1, seed=0, surrogate="fesf", **sizes)[0], task="classify"
    )
    plain = load_site_data(
        build_sites(root / "inv-plain", n_sites=1, seed=0, surrogate="plain", **sizes)[0], task="classify"
    )
    model = build_model("classify", base_channels=cfg.base_channels, seed=cfg.seed)
    pos, neg = np.flatnonzero(fesf.targets == 1), np.flatnonzero(fesf.targets == 0)
    picks = [int(i) for pair in zip(pos, neg, strict=False) for i in pair][:n_crops]
    blank = np.random.default_rng(0).normal(scale=1e-3, size=fesf.images.shape[1:])  # ~constant, std > 0
    rows: dict[str, list[float]] = {}
    for j, i in enumerate(picks):
        refs = {"surrogate": fesf.images[i], "plaintext": plain.images[i]}
        for k, v in image_quality(plain.images[i], fesf.images[i]).items():
            rows.setdefault(f"surrogate_{k}_vs_plaintext", []).append(v)
        for name, ref in refs.items():
            for k, v in image_quality(ref, blank).items():
                rows.setdefault(f"blank_{k}_vs_{name}", []).append(v)
        for mode in ("eval", "train"):
            grads = slice_gradient(model, fesf.images[i], int(fesf.targets[i]), device=CPU, train_mode=mode == "train")
            rec = invert_gradient(
                model,
                grads,
                shape=fesf.images[i].shape,
                iterations=iterations,
                tv_weight=1e-3,
                generator=torch.Generator().manual_seed(j),
                device=CPU,
                train_mode=mode == "train",
            )
            for name, ref in refs.items():
                for k, v in image_quality(ref, rec).items():
                    rows.setdefault(f"{mode}_{k}_vs_{name}", []).append(v)
    m = {k: float(np.mean(v)) for k, v in rows.items()}
    best = max(("eval", "train"), key=lambda md: m[f"{md}_ssim_vs_surrogate"])
    out: dict[str, Any] = {
        "inversion_psnr_vs_surrogate_db": m[f"{best}_psnr_db_vs_surrogate"],
        "inversion_psnr_vs_plaintext_db": m[f"{best}_psnr_db_vs_plaintext"],
        "inversion_ssim_vs_surrogate": m[f"{best}_ssim_vs_surrogate"],
        "inversion_ssim_vs_plaintext": m[f"{best}_ssim_vs_plaintext"],
        "inversion_blank_psnr_vs_surrogate_db": m["blank_psnr_db_vs_surrogate"],
        "inversion_blank_psnr_vs_plaintext_db": m["blank_psnr_db_vs_plaintext"],
        "surrogate_psnr_vs_plaintext_db": m["surrogate_psnr_db_vs_plaintext"],
        "surrogate_ssim_vs_plaintext": m["surrogate_ssim_vs_plaintext"],
        "inversion_bn_mode": best,
        "inversion_crops": float(len(picks)),
        "inversion_iterations": float(iterations),
        "inversion_by_bn_mode": {
            md: {k.removeprefix(f"{md}_"): v for k, v in m.items() if k.startswith(f"{md}_")}
            for md in ("eval", "train")
        },
    }
    # what it recovers: the image it matches better, by SSIM, if it beats a blank guess on that image at all
    sur_gain = out["inversion_psnr_vs_surrogate_db"] - out["inversion_blank_psnr_vs_surrogate_db"]
    plain_gain = out["inversion_psnr_vs_plaintext_db"] - out["inversion_blank_psnr_vs_plaintext_db"]
    out["inversion_psnr_gain_over_blank_vs_surrogate_db"] = sur_gain
    out["inversion_psnr_gain_over_blank_vs_plaintext_db"] = plain_gain
    if max(sur_gain, plain_gain) <= 1.0:
        out["inversion_resembles"] = "neither"
    elif out["inversion_ssim_vs_surrogate"] >= out["inversion_ssim_vs_plaintext"]:
        out["inversion_resembles"] = "surrogate"
    else:
        out["inversion_resembles"] = "plaintext"
    return out


def run(quick: bool) -> dict[str, Any]:
    """Every figure of the model side; see the module docstring. Runs on one torch thread (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(quick)
    finally:
        torch.set_num_threads(threads)


def _run(quick: bool) -> dict[str, Any]:
    sizes = _sizes(quick)
    rounds, test_scans, n_sites = (8, 6, 3) if quick else (12, 12, 3)
    base = FederationConfig(
        num_rounds=rounds,
        local_epochs=2,
        learning_rate=3e-3,
        batch_size=16,
        base_channels=8,
        min_available_clients=2,
        seed=0,
        local_bn_statistics=True,
    )
    root = Path(tempfile.mkdtemp(prefix="fedscan-privacy-model-"))
    out: dict[str, Any] = {}
    try:
        stores = build_sites(root / "sites", n_sites=n_sites, seed=0, surrogate="fesf", **sizes)
        tests = build_sites(
            root / "test-sites",
            n_sites=n_sites,
            seed=0,
            surrogate="fesf",
            first_scan=sizes["n_scans"],
            **{**sizes, "n_scans": test_scans},
        )
        splits = [
            (tr, extend_holdout(h, load_site_data(ts, task="classify")))
            for (tr, h), ts in zip(
                (
                    split_holdout(
                        load_site_data(s, task="classify"), fraction=base.holdout_fraction, seed=base.holdout_seed
                    )
                    for s in stores
                ),
                tests,
                strict=True,
            )
        ]
        test = pooled_test(splits)
        boot = bootstrap_indices(test[1], n_boot=1000, seed=12345)
        arms: dict[str, dict[str, Any]] = {"default": {}, "secagg": {"secagg": True}}
        sigmas = DP_SIGMAS[quick]
        for s in sigmas:
            arms[f"dp_sigma{s:g}"] = {
                "dp_mode": "server",
                "dp_clipping_norm": DP_CLIPPING_NORM,
                "dp_noise_multiplier": s,
            }
        attack = shadow_attack(root, base, n_shadows=1 if quick else 2, n_sites=n_sites, sizes=sizes)
        table: dict[str, dict[str, float]] = {}
        boots: dict[str, Any] = {}
        for name, kw in arms.items():
            cfg = FederationConfig.model_validate({**base.model_dump(), **kw})
            kept: dict[str, Any] = {}
            row: dict[str, Any] = _federated_row(name, cfg, stores, root / name, test, splits, keep=kept)
            grid, recs = kept["grid"], kept["records"]
            entry: dict[str, float] = {"auc": float(row["auc"]), "diverged": float(bool(row["diverged"]))}
            if "dp_epsilon" in row:
                entry.update(epsilon=float(row["dp_epsilon"]), noise_multiplier=float(cfg.dp_noise_multiplier))
            if not row["diverged"]:
                boots[name] = bootstrap_aucs([row["scores"]], test[1], boot)
                train = [r for r in recs if r.phase == "train"]
                final = next(r.model_dir for r in reversed(train) if r.model_dir)
                li, lo, yi, yo = _losses(site_models(grid, final, splits, cfg), splits)
                entry["membership_auc_loss"] = loss_attack_auc(li, lo)
                entry["membership_auc_shadow"] = attack.auc(attack_features(li, yi), attack_features(lo, yo))
                entry["train_minus_heldout_accuracy"] = float(np.mean(li < math.log(2)) - np.mean(lo < math.log(2)))
            if cfg.secagg:
                entry["individual_updates_seen"] = float(
                    sum(
                        1
                        for m in grid.received
                        if m.metadata.message_type == "train"
                        and not m.has_error()
                        and any(len(rec) for rec in m.content.array_records.values())
                    )
                )
            table[name] = entry
            print(f"privacy-model {name}: {entry}", flush=True)
        d = table["default"]
        out["auc_default"] = d["auc"]
        out["membership_auc_loss"] = d["membership_auc_loss"]
        out["membership_auc_shadow"] = d["membership_auc_shadow"]
        out["membership_auc"] = max(d["membership_auc_loss"], d["membership_auc_shadow"])
        out["auc_secagg_minus_default"] = table["secagg"]["auc"] - d["auc"]
        if "secagg" in boots:
            out["auc_secagg_minus_default_ci95"] = list(percentile_ci(boots["secagg"] - boots["default"]))
        out["secagg_individual_updates_seen"] = table["secagg"]["individual_updates_seen"]
        private = f"dp_sigma{max(sigmas):g}"  # the headline DP arm: the most noise, the smallest ε
        cheap = f"dp_sigma{min(sigmas):g}"
        for key, arm in (("dp", private), ("dp_low_noise", cheap)):
            t = table[arm]
            out[f"auc_{key}_minus_default"] = t["auc"] - d["auc"]  # NaN when the run diverged
            out[f"{key}_epsilon"] = t["epsilon"]
            out[f"{key}_noise_multiplier"] = t["noise_multiplier"]
            out[f"{key}_diverged"] = t["diverged"]
            out[f"membership_auc_{key}"] = max(
                t.get("membership_auc_loss", float("nan")), t.get("membership_auc_shadow", float("nan"))
            )
            if arm in boots:
                out[f"auc_{key}_minus_default_ci95"] = list(percentile_ci(boots[arm] - boots["default"]))
        out["epsilon"] = out["dp_epsilon"]
        out["dp_delta"] = DP_DELTA
        out["membership_by_arm"] = table
        out.update(inversion(root, base, n_crops=2 if quick else 6, iterations=600 if quick else 1500))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out


def main() -> None:
    args = parse_args(__doc__.split("\n")[0])
    result = run(args.quick)
    print(json.dumps(result, indent=2, default=str))
    write_json(args.json, [], result, mode="quick" if args.quick else "full")  # strict JSON: NaN → null


if __name__ == "__main__":
    main()
