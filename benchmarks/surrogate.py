"""FESF surrogates: privacy (PSNR/SSIM, inversion attacks, host identification), utility (lesion AUC), speed.

Usage::

    python benchmarks/surrogate.py --quick --json out.json
    python benchmarks/surrogate.py --json out.json --png tradeoff.png --threads 1 --attack-steps 600
    python benchmarks/surrogate.py --quick --image slice.npy --pixel-mm 0.8
    python benchmarks/surrogate.py --only speed --threads 1 --speed-batch 16    # hiding throughput alone
    python benchmarks/surrogate.py --save-data /tmp/d.npz                      # build the data once, then
    python benchmarks/surrogate.py --data /tmp/d.npz --only sweep --png tradeoff.png --sweep-seeds 3

Task: the lesion crop task (``benchmarks._crops``, the same as ``benchmarks/federated.py``). Demo sites
(``schemas.demo.default_sites``, lesions 10–18 mm, 100–250 HU with each site's polarity, half the slices with a
lesion) rendered noise-free at ``--grid`` (128², about 3 mm pixels); per slice two ``--crop``² (32²) crops, the
first on a lesion slice centred on the lesion (jittered by up to a quarter crop), the other at a lesion-free body
pixel; a crop is positive when a lesion pixel lies inside it. The last scan of every site is the test set (held-out
scans). (The whole-slice task is at chance for this classifier: 1–5 px lesions in 128².)

What is shared is the crop's surrogate: each crop is hidden on its own with a 32² host, the site's ``fixed`` host
(:class:`schemas.surrogate.SurrogateConfig` policy, drawn from the site's host seed) rendered or resampled whole to
32² by :func:`tasks.surrogate.hosts.load_host` (centre-cropped to square, bilinear with anti-aliasing), the mask
half-width ⌊α·32⌋ bins. Every privacy row is measured on those crops; one row repeats surrogate-vs-private on the
whole 128² slices hidden with the same host at 128². The attacker's public data are 32² crops of public CT-like
slices (:func:`public_crops`).

Rows: ``privacy`` (surrogate vs private, host identification, attacks), ``utility`` (plaintext / surrogates /
IQEM surrogates), ``sweep`` (α, β), ``speed``.

Utility: the same classifier (:func:`tasks.surrogate.evaluation.train_classifier`) trained once per seed on
plaintext crops, surrogates and IQEM surrogates; AUC and accuracy are seed means with 95 % Student-t intervals.
The AUC drop is paired by seed (same initial weights and batch order on plaintext and surrogates) and its 95 %
interval decides the target: ``met`` (interval below 0.03), ``missed`` (above), ``undecided``.

Attack baseline (``attack_psnr_drop_db``). The target reads "the attacker's PSNR at least 10 dB below what it
achieves on the unprotected image pipeline". Without hiding, the site shares the image itself, so the same U-Net,
trained the same way on public (image, image) pairs and applied to the site's images, recovers it essentially
exactly. We therefore cap the unprotected PSNR at ``UNPROTECTED_CAP_DB`` = 46 dB, the PSNR of a 10 HU RMS error in
the 2000 HU window (typical CT noise): anything above that is "the image, recovered". ``attack_psnr_drop_db`` =
min(PSNR(unprotected attack), 46 dB) − PSNR(known-host attack on the surrogates). Because that statement is weak
(a blank guess scores well below 36 dB), the table also reports the *prior floor*, the same known-host attack on
surrogates made with α = 0 (nothing embedded: the attacker sees only the host and can output at best the public
mean image), and ``attack_gain_over_prior_db`` = PSNR(known-host attack) − PSNR(α = 0 attack): how much the
surrogate reveals beyond what public data already give; near 0 is good. Attacks train ``--attack-steps`` steps;
their rows give the training L1 by quarter of the steps (``l1_q1..4``) and the known-host row the PSNR of the same
attack trained for half the steps (``psnr_db_half_steps``): both show whether longer training would help.

Sweep: per (α, β) the surrogate SSIM on all crops, the known-host attack on the first site's crops
(``--sweep-attack-steps``), AUC and paired drop over ``--sweep-seeds`` seeds. Recommendation: among the points
that hold both privacy targets (attack drop >= 10 dB, SSIM < 0.3), the smallest AUC drop.

Ratios: ``attack_psnr_drop_db`` (above), ``surrogate_ssim`` (crops), ``auc_drop_vs_plaintext`` = AUC(plaintext) −
AUC(surrogates) (and ``_iqem``, and their ``_ci95``), ``hide_slices_per_s`` (512², ``--threads`` torch threads,
CPU, the first ``--speed-batch`` size; 8 by default, the surrogate stage's block of 512² slices) and
``hide_speedup_vs_full_fft2``: the same calls against :func:`hide_full_spectrum`, the IHM written plainly on the
whole spectrum, measured alternately in the same run.

One script, though over 600 lines: every row group (privacy, utility, sweep, speed) reads the same crop sites and
public attack data (built once, or loaded with ``--data``), and the recommendation and ratio keys combine all of
them into one JSON; ``--only`` runs a group alone. The reusable parts already live in the package
(``tasks.surrogate.evaluation``, ``benchmarks._crops``); what stays here is the wiring of this one experiment.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import parse_args, print_table, write_json

#: Below this plaintext AUC the classifier has not learnt the task, and AUC differences say nothing about utility.
MIN_INFORMATIVE_PLAINTEXT_AUC = 0.8
#: PSNR of a 10 HU RMS error in the 2000 HU window: an unprotected attack above it has recovered the image.
UNPROTECTED_CAP_DB = 20 * np.log10(2000.0 / 10.0)
#: The utility target: the AUC on surrogates within this of the plaintext AUC.
AUC_DROP_BOUND = 0.03


@dataclass
class Site:
    site_id: str
    host_seed: int
    private: np.ndarray  # (n, crop, crop) unit range: the crops, the unit the classifier and the attacks see
    mu: np.ndarray  # (n, crop, crop) 1/mm
    labels: np.ndarray  # (n,) 0/1: a lesion pixel inside the crop
    scan: np.ndarray  # (n,) scan index within the site of each crop
    water: float
    slice_mu: np.ndarray  # (m, grid, grid) 1/mm: the whole slices the crops were cut from (slice-level rows)


def make_sites(n_sites, n_scans, n_slices, grid, *, crop, crops_per_slice, seed):
    """Demo sites with the crop task's lesions (``benchmarks._crops``), prevalence 0.5 of slices; per slice
    ``crops_per_slice`` crops of ``crop``² (the first on a lesion slice centred on the lesion, jittered; the
    others at lesion-free body pixels), labelled by the lesion mask inside the crop."""
    from benchmarks._crops import LESION_CONTRAST_HU, LESION_RADIUS_MM, crop_centres, cut_crops
    from schemas.demo import default_sites
    from tasks.demo.generate import plan_scan, render_truth
    from tasks.surrogate.kernels import to_unit_range

    sites = []
    for si, profile in enumerate(default_sites(n_sites)):
        sign = 1.0 if profile.lesion_contrast_hu[1] > 0 else -1.0  # keep each site's lesion polarity
        p = type(profile).model_validate(
            {
                **profile.model_dump(),
                "lesion_radius_mm": LESION_RADIUS_MM,
                "lesion_contrast_hu": tuple(sorted(sign * c for c in LESION_CONTRAST_HU)),
                "lesion_prevalence_fraction": 0.5,
            }
        )
        water = p.water_attenuation_per_mm
        mus, labels, scans, slices = [], [], [], []
        for k in range(n_scans):
            plan = plan_scan(p, n_slices=n_slices, grid=p.grid(grid), rng=np.random.default_rng([seed, si, k]))
            mu, masks = render_truth(plan, 0, n_slices)
            centres = crop_centres(
                masks,
                mu > 0.5 * water,
                crop=crop,
                per_slice=crops_per_slice,
                rng=np.random.default_rng([seed, si, k, 1]),
            )
            mus.append(cut_crops(mu, centres, crop=crop))
            labels.append(cut_crops(masks, centres, crop=crop).reshape(len(centres), -1).any(axis=1).astype(np.int64))
            scans.append(np.full(len(centres), k))
            slices.append(mu)
        mu_c = np.concatenate(mus).astype(np.float32)
        sites.append(
            Site(
                p.site_id,
                1000 + 17 * si,
                to_unit_range(mu_c, unit="per_mm", water_attenuation_per_mm=water),
                mu_c,
                np.concatenate(labels),
                np.concatenate(scans),
                water,
                np.concatenate(slices).astype(np.float32),
            )
        )
    return sites


def public_crops(n, grid, crop, *, rng):
    """``n`` public ``crop``² attacker images: 4 crops at random body pixels (> 0.25, i.e. above half water) of
    each of ``ceil(n / 4)`` public ``grid``² CT-like slices (:func:`public_ct_like_images`); no site data."""
    from tasks.surrogate.evaluation import public_ct_like_images

    images = public_ct_like_images(-(-n // 4), (grid, grid), rng=rng)
    half, out = crop // 2, []
    for img in images:
        inside = np.argwhere(img > 0.25)
        for _ in range(4):
            cy, cx = (int(np.clip(v, half, grid - half)) for v in inside[rng.integers(len(inside))])
            out.append(img[cy - half : cy + half, cx - half : cx + half])
    return np.stack(out[:n]).astype(np.float32)


_FIELDS = ("private", "mu", "labels", "scan", "slice_mu")


def save_data(path, sites, public):
    arrays = {"public": public}
    for s in sites:
        for field in _FIELDS:
            arrays[f"{s.site_id}|{s.host_seed}|{s.water}|{field}"] = getattr(s, field)
    np.savez_compressed(path, **arrays)


def load_data(path):
    z = np.load(path)
    groups: dict[tuple[str, int, float], dict[str, np.ndarray]] = {}
    for key in z.files:
        if key != "public":
            site_id, seed, water, field = key.split("|")
            groups.setdefault((site_id, int(seed), float(water)), {})[field] = z[key]
    sites = [Site(k[0], k[1], *(v[f] for f in _FIELDS[:4]), k[2], v["slice_mu"]) for k, v in groups.items()]
    return sites, z["public"]


def site_config(site, *, alpha, beta, iqem=None):
    from schemas.surrogate import IqemConfig, SurrogateConfig

    return SurrogateConfig(
        alpha=alpha,
        beta=beta,
        host_seed=site.host_seed,
        input_unit="per_mm",
        water_attenuation_per_mm=site.water,
        iqem=iqem or IqemConfig(),
    )


def site_host(site, shape, config):
    from tasks.surrogate.hosts import HOST_NAMES, select_host_indices

    idx = int(
        select_host_indices(
            np.array([0]),
            policy=config.host_policy,
            seed=config.host_seed,
            site_id=site.site_id,
            n_hosts=len(HOST_NAMES),
        )[0]
    )
    from tasks.surrogate.hosts import load_host

    return idx, np.array(load_host(HOST_NAMES[idx], shape))


def surrogates_of(site, config, generator=None, device="cpu"):
    from tasks.surrogate.chunked import surrogate_slices

    return surrogate_slices(site.mu, config=config, site_id=site.site_id, generator=generator, device=device)


def loss_quarters(history):
    """Mean training L1 of each quarter of the steps: a flat tail (q3 ≈ q4) says the attack has converged."""
    return {f"l1_q{i + 1}": float(np.mean(q)) for i, q in enumerate(np.array_split(np.asarray(history), 4))}


def _train_attack(inputs, targets, settings):
    from tasks.surrogate.evaluation import train_regressor

    history: list[float] = []
    return train_regressor(inputs, targets, settings=settings, history=history), history


def attack_rows(sites, surr, *, alpha, beta, public, settings, rng, rows, case, known_only=False, convergence=False):
    """Unprotected, pool and known-host inversion attacks on the shared images ``surr`` (per site, the same shape
    as ``public``); returns the known-host PSNR/SSIM (slice-weighted). Every row carries the training L1 by
    quarter of the steps; with ``convergence`` the known-host attack is also trained for half the steps
    (``psnr_db_half_steps``): PSNR(steps) − PSNR(steps / 2) near 0 says more steps would not help."""
    from tasks.surrogate.evaluation import TrainSettings, image_metrics, predict
    from tasks.surrogate.hosts import HOST_NAMES, load_host
    from tasks.surrogate.kernels import hide

    shape = public.shape[1:]
    out = {}
    private = np.concatenate([s.private for s in sites])

    def attack_row(method, psnr, ssim, hist, t0, **extra):
        return {
            "case": case,
            "method": method,
            "psnr_db": psnr,
            "ssim": ssim,
            "steps": settings.steps,
            **loss_quarters(hist),
            **extra,
            "train_s": time.perf_counter() - t0,
        }

    if not known_only:
        pool = np.stack([np.array(load_host(n, shape)) for n in HOST_NAMES])
        t0 = time.perf_counter()
        net, hist = _train_attack(public, public, settings)
        psnr, ssim = image_metrics(private, predict(net, private))
        rows.append(attack_row("attack-unprotected", psnr, ssim, hist, t0))
        out["unprotected"] = (psnr, ssim)
        t0 = time.perf_counter()
        pool_in = hide(public, pool[rng.integers(len(pool), size=len(public))], alpha=alpha, beta=beta)
        net, hist = _train_attack(pool_in, public, settings)
        rec = np.concatenate([predict(net, surr[s.site_id]) for s in sites])
        psnr, ssim = image_metrics(private, rec)
        rows.append(attack_row("attack-pool-hosts", psnr, ssim, hist, t0))
        out["pool"] = (psnr, ssim)
    ps, ss, ns, ph, hists = [], [], [], [], []
    t0 = time.perf_counter()
    known = TrainSettings(**{**settings.__dict__, "seed": settings.seed + 1})
    for s in sites:
        _, host = site_host(s, shape, site_config(s, alpha=alpha, beta=beta))
        inputs = hide(public, host, alpha=alpha, beta=beta)
        net, hist = _train_attack(inputs, public, known)
        psnr, ssim = image_metrics(s.private, predict(net, surr[s.site_id]))
        ps.append(psnr)
        ss.append(ssim)
        ns.append(len(s.private))
        hists.append(hist)
        if convergence:
            half = TrainSettings(**{**known.__dict__, "steps": max(1, known.steps // 2)})
            net, _ = _train_attack(inputs, public, half)
            ph.append(image_metrics(s.private, predict(net, surr[s.site_id]))[0])
    psnr, ssim = float(np.average(ps, weights=ns)), float(np.average(ss, weights=ns))
    half_steps = {"psnr_db_half_steps": float(np.average(ph, weights=ns))} if convergence else {}
    rows.append(attack_row("attack-known-host", psnr, ssim, np.mean(hists, axis=0), t0, **half_steps))
    out["known"] = (psnr, ssim)
    return out


def split(sites, images):
    tr_x, tr_y, te_x, te_y = [], [], [], []
    for s in sites:
        test = s.scan == s.scan.max()
        tr_x.append(images[s.site_id][~test])
        tr_y.append(s.labels[~test])
        te_x.append(images[s.site_id][test])
        te_y.append(s.labels[test])
    return (np.concatenate(tr_x), np.concatenate(tr_y)), (np.concatenate(te_x), np.concatenate(te_y))


def hide_full_spectrum(x, hosts, *, alpha, beta):
    """The speed peer: the IHM written directly in torch on the whole spectrum (``fft2`` → amplitude and phase →
    mask → ``ifft2``), batched, float32, the way one would write it from the paper. Not used by fedscan."""
    import torch

    from tasks.surrogate.kernels import low_frequency_mask

    fx, fy = torch.fft.fft2(x), torch.fft.fft2(hosts)
    mixed = torch.polar((1.0 - beta) * fy.abs() + beta * fx.abs(), fy.angle())
    mask = torch.from_numpy(low_frequency_mask(tuple(x.shape[-2:]), alpha=alpha)).to(x.device)
    return torch.fft.ifft2(torch.where(mask, mixed, fy)).real


def throughput(device_name, *, n=16, size=512, repeat=3, iqem=True):
    """Slices per second at ``n`` slices per call: fedscan's ``hide`` (one host; a host per slice), the
    :func:`hide_full_spectrum` peer on the same batch, and IQEM inference. The kernel and its peer alternate in
    runs of a few calls, so both see the same stretches of a noisy machine; each keeps its fastest call."""
    import torch

    from tasks.surrogate.hosts import load_host
    from tasks.surrogate.iqem import Generator, enhance
    from tasks.surrogate.kernels import hide

    dev = torch.device(device_name)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.random((n, size, size), dtype=np.float32)).to(dev)
    h = torch.from_numpy(np.array(load_host("camera", (size, size)))).to(dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def timed(*fns, calls=3):
        """Best seconds per function over ``repeat`` rounds; in each round every function runs ``calls`` times
        in a row (the first call after another function's pays for the cache and heap that one left)."""
        best = [float("inf")] * len(fns)
        for fn in fns:
            fn()
        sync()
        for _ in range(repeat):
            for j, fn in enumerate(fns):
                for _ in range(calls):
                    t0 = time.perf_counter()
                    fn()
                    sync()
                    best[j] = min(best[j], time.perf_counter() - t0)
        return [n / b for b in best]

    hide_rate, peer_rate = timed(
        lambda: hide(x, h, alpha=0.1, beta=0.5), lambda: hide_full_spectrum(x, h, alpha=0.1, beta=0.5)
    )
    (hide_random_rate,) = timed(lambda: hide(x, x.flip(0), alpha=0.1, beta=0.5))
    iqem_rate = float("nan")
    if iqem:
        g = Generator(16).to(dev).eval()
        (iqem_rate,) = timed(lambda: enhance(x, g, batch_size=8))
    return {"hide": hide_rate, "peer": peer_rate, "hide_per_slice_host": hide_random_rate, "iqem": iqem_rate}


#: The speed rows' methods: (row label, key of :func:`throughput`'s result).
SPEED_METHODS = (
    ("hide, one host", "hide"),
    ("peer: full-spectrum fft2 hide", "peer"),
    ("hide, a host per slice", "hide_per_slice_host"),
    ("iqem G inference", "iqem"),
)


def speed_rows(own, *, batches, repeat, cuda):
    """The 512² throughput rows (CPU, and CUDA when asked and present) at each batch size; the ratio keys come
    from the first batch size."""
    import torch

    # (case, device, batch, rounds, IQEM row): IQEM inference once on the CPU (full runs), always on CUDA.
    runs = [
        (f"speed 512² cpu, batch {n}, {own.threads} threads", "cpu", n, repeat, own.only is None and n == batches[0])
        for n in batches
    ]
    if cuda and torch.cuda.is_available():
        runs.append(("speed 512² cuda, batch 64", "cuda", 64, 3, True))
    rows = []
    keys: dict[str, float] = {}
    for case, device, n, rounds, iqem in runs:
        r = throughput(device, n=n, repeat=rounds, iqem=iqem)
        rows += [
            {"case": case, "method": method, "slices_per_s": r[key]}
            for method, key in SPEED_METHODS
            if not np.isnan(r[key])
        ]
        if not keys:
            keys = {"hide_slices_per_s": r["hide"], "hide_speedup_vs_full_fft2": r["hide"] / r["peer"]}
    return rows, keys


def drop_stats(plain_aucs, aucs, *, bound=AUC_DROP_BOUND):
    """Paired per-seed AUC drop (plaintext − surrogate, same seed = same initial weights and batch order): mean,
    95 % CI half-width and the verdict against ``bound``: ``met`` (CI below), ``missed`` (CI above), else
    ``undecided``."""
    from tasks.surrogate.evaluation import mean_ci

    drop, half = mean_ci([a - b for a, b in zip(plain_aucs, aucs, strict=True)])
    verdict = "met" if drop + half < bound else "missed" if drop - half > bound else "undecided"
    return {"auc_drop": drop, "auc_drop_ci95": half, "verdict": verdict}


def utility(sites, images, *, seeds, settings, plain_aucs=None):
    """AUC / accuracy (mean, 95 % CI over ``seeds``) of the classifier trained on the first scans and tested on
    the held-out last scan of every site; with ``plain_aucs`` (per seed) also the paired drop."""
    from tasks.surrogate.evaluation import classify_per_seed, mean_ci

    train, test = split(sites, images)
    aucs, accs = classify_per_seed(train, test, seeds=seeds, settings=settings)
    auc, auc_ci = mean_ci(aucs)
    acc, acc_ci = mean_ci(accs)
    out = {"auc": auc, "auc_ci95": auc_ci, "accuracy": acc, "accuracy_ci95": acc_ci}
    if plain_aucs is not None:
        out.update(drop_stats(plain_aucs, aucs))
    return out, aucs


def sweep_points(sites, public, p, rng, rows, t_start, *, plain_aucs):
    """Privacy (surrogate-vs-private SSIM on all crops; known-host attack on the first site's crops) and utility
    (AUC and its paired drop vs ``plain_aucs``, one per sweep seed) for every (α, β)."""
    from tasks.surrogate.evaluation import image_metrics

    private_all = np.concatenate([s.private for s in sites])
    points = []
    for a, b in p["sweep"]:
        cfgs = {s.site_id: site_config(s, alpha=a, beta=b) for s in sites}
        sw = {s.site_id: surrogates_of(s, cfgs[s.site_id]) for s in sites}
        ps_, ss_ = image_metrics(private_all, np.concatenate([sw[s.site_id] for s in sites]))
        sub_rows: list[dict[str, object]] = []
        att = attack_rows(
            sites[:1],
            sw,
            alpha=a,
            beta=b,
            public=public,
            settings=p["attack_sweep"],
            rng=rng,
            rows=sub_rows,
            case="sweep",
            known_only=True,
        )
        u, aucs = utility(sites, sw, seeds=p["sweep_seeds"], settings=p["clf"], plain_aucs=plain_aucs)
        pt = {
            "alpha": a,
            "beta": b,
            "surrogate_psnr_db": ps_,
            "surrogate_ssim": ss_,
            "attack_psnr_db": att["known"][0],
            "attack_ssim": att["known"][1],
            **u,
            "auc_per_seed": aucs,
        }
        points.append(pt)
        rows.append(
            {
                "case": "sweep",
                "method": f"a={a:g} b={b:g}",
                **{
                    k: v
                    for k, v in pt.items()
                    if k not in ("alpha", "beta", "accuracy", "accuracy_ci95", "auc_per_seed")
                },
            }
        )
        print(f"sweep a={a} b={b} done ({time.perf_counter() - t_start:.0f} s)", flush=True)
    return points


def recommend(points, *, unprot, plain_auc):
    """Both privacy targets first (attack drop >= 10 dB below ``unprot``, surrogate SSIM < 0.3); among those the
    point with the smallest AUC drop (ties: the lower attack PSNR); None if no point is private enough.
    ``utility_informative`` is False when the plaintext AUC is below :data:`MIN_INFORMATIVE_PLAINTEXT_AUC`."""
    ok = [q for q in points if unprot - q["attack_psnr_db"] >= 10 and q["surrogate_ssim"] < 0.3]
    if not ok:
        return None
    best = min(ok, key=lambda q: (round(q["auc_drop"], 4), q["attack_psnr_db"]))
    return {
        "alpha": best["alpha"],
        "beta": best["beta"],
        "auc": best["auc"],
        "auc_drop_vs_plaintext": best["auc_drop"],
        "auc_drop_ci95": best["auc_drop_ci95"],
        "utility_verdict": best["verdict"],
        "attack_psnr_db": best["attack_psnr_db"],
        "attack_psnr_drop_db": float(unprot - best["attack_psnr_db"]),
        "surrogate_ssim": best["surrogate_ssim"],
        "private_points": len(ok),
        # False: the plaintext classifier is near chance, so "within 0.03 of plaintext" is not evidence of utility.
        "utility_informative": bool(plain_auc >= MIN_INFORMATIVE_PLAINTEXT_AUC),
    }


def sweep_only(own, args, sites, public, p, rng):
    """``--only sweep``: the unprotected attack, plaintext AUC with the sweep's seeds, the sweep, the PNG."""
    from tasks.surrogate.evaluation import image_metrics, predict

    t_start = time.perf_counter()
    rows: list[dict[str, object]] = []
    private = np.concatenate([s.private for s in sites])
    net, _ = _train_attack(public, public, p["attack"])
    unprot_psnr, unprot_ssim = image_metrics(private, predict(net, private))
    rows.append({"case": "reference", "method": "attack-unprotected", "psnr_db": unprot_psnr, "ssim": unprot_ssim})
    plain, plain_aucs = utility(sites, {s.site_id: s.private for s in sites}, seeds=p["sweep_seeds"], settings=p["clf"])
    rows.append({"case": "reference", "method": "plaintext (sweep seeds)", **plain})
    print(f"references done ({time.perf_counter() - t_start:.0f} s)", flush=True)
    points = sweep_points(sites, public, p, rng, rows, t_start, plain_aucs=plain_aucs)
    unprot = min(unprot_psnr, UNPROTECTED_CAP_DB)
    recommendation = recommend(points, unprot=unprot, plain_auc=plain["auc"])
    if own.png is not None:
        from tasks.surrogate.evaluation import draw_tradeoff_png

        draw_tradeoff_png(
            points, own.png, reference={"attack_psnr_db": unprot, "auc": plain["auc"]}, note=_png_note(p, own)
        )
    print_table(rows)
    print(f"recommended (attack drop >= 10 dB and SSIM < 0.3, then smallest AUC drop): {recommendation}")
    write_json(
        args.json,
        rows,
        {"plaintext_auc": plain["auc"], "unprotected_attack_psnr_db_capped": unprot},
        sweep=points,
        recommendation=recommendation,
        plaintext_auc_per_seed=plain_aucs,
        settings={"only": "sweep", **_settings_record(own, args, p)},
    )


def _png_note(p, own):
    return (
        f"{own.crop}x{own.crop} crops of {own.grid}x{own.grid} slices; "
        f"AUC: mean ± 95 % CI over {len(p['sweep_seeds'])} seeds\n"
        f"attack: known host, first site's crops, {p['attack_sweep'].steps} steps\n"
        "unprotected attack capped at 46 dB (10 HU RMS)"
    )


def _settings_record(own, args, p):
    return {
        "quick": args.quick,
        "device": own.device,
        "grid": own.grid,
        "crop": own.crop,
        "threads": own.threads,
        "seeds": p["seeds"],
        "sweep_seeds": p["sweep_seeds"],
        "attack": p["attack"].__dict__,
        "attack_sweep": p["attack_sweep"].__dict__,
        "classifier": p["clf"].__dict__,
        "sizes": {k: p[k] for k in ("n_scans", "n_slices", "crops_per_slice", "public")},
    }


def main() -> None:
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--device", default="cpu", help="torch device of the networks (cpu | cuda)")
    extra.add_argument("--png", type=Path, default=None, help="write the privacy–utility curve here")
    extra.add_argument("--grid", type=int, default=128, help="slice size the crops are cut from, pixels")
    extra.add_argument("--crop", type=int, default=32, help="crop size: what is hidden and shared, pixels")
    extra.add_argument("--threads", type=int, default=2, help="torch CPU threads (the target is 2 cores)")
    extra.add_argument("--smoke", action="store_true", help="tiny everything: checks the code paths only")
    extra.add_argument("--save-data", type=Path, default=None, help="write the generated data (npz) and stop")
    extra.add_argument("--data", type=Path, default=None, help="read the data from a --save-data npz")
    extra.add_argument(
        "--only",
        choices=("speed", "sweep"),
        default=None,
        help="run one part only: speed = the 512² throughput rows; sweep = references and the α–β sweep",
    )
    extra.add_argument(
        "--speed-batch",
        default=None,
        help="slices per hide call in the speed rows, comma-separated; the first gives the ratio keys "
        "(default: 8, the stage's block of 512² slices; full runs also 16 and 32)",
    )
    extra.add_argument(
        "--speed-repeat", type=int, default=5, help="rounds per speed row, 3 calls each (best call kept)"
    )
    extra.add_argument("--seeds", type=int, default=None, help="classifier seeds of the utility rows")
    extra.add_argument("--attack-steps", type=int, default=None, help="optimiser steps of every attack U-Net")
    extra.add_argument("--sweep", default=None, help="sweep grid as 'a:b,a:b,...' or 'none' (default: by mode)")
    extra.add_argument("--no-speed", action="store_true", help="skip the 512² throughput rows")
    extra.add_argument("--sweep-seeds", type=int, default=None, help="classifier seeds per sweep point")
    extra.add_argument("--sweep-attack-steps", type=int, default=None, help="attack U-Net steps per sweep point")
    own = args = parse_args(__doc__.split("\n")[0], image=True, parents=[extra])

    import torch

    from schemas.surrogate import IqemConfig
    from tasks.surrogate.evaluation import TrainSettings, draw_tradeoff_png, identify_hosts, image_metrics
    from tasks.surrogate.hosts import HOST_NAMES, load_host
    from tasks.surrogate.iqem import train_iqem

    warnings.filterwarnings("ignore", category=UserWarning)
    torch.set_num_threads(own.threads)
    device = own.device
    quick = args.quick
    crop = own.crop
    p: dict[str, Any] = {
        "n_scans": 3 if quick else 6,
        "n_slices": 12 if quick else 48,
        "crops_per_slice": 2,
        "public": 96 if quick else 1024,
        "attack": TrainSettings(
            steps=30 if quick else 600, batch_size=8 if quick else 16, learning_rate=2e-3, device=device
        ),
        "attack_sweep": TrainSettings(
            steps=20 if quick else 400, batch_size=8 if quick else 16, learning_rate=2e-3, device=device
        ),
        "clf": TrainSettings(
            steps=120 if quick else 600, batch_size=16 if quick else 32, learning_rate=2e-3, device=device
        ),
        "seeds": [0, 1, 2] if quick else [0, 1, 2, 3, 4],
        "sweep_seeds": [0, 1, 2],
        "iqem": IqemConfig(enabled=True, steps=20 if quick else 300, batch_size=8, channels=16, seed=0),
        "sweep": [(0.3, 1.0)] if quick else [(a, b) for a in (0.05, 0.1, 0.2, 0.3) for b in (0.5, 1.0)],
    }
    if own.smoke:
        tiny = TrainSettings(steps=2, batch_size=2, device=device)
        p.update(
            n_scans=2,
            n_slices=8,
            public=8,
            attack=tiny,
            attack_sweep=tiny,
            clf=tiny,
            seeds=[0, 1],
            sweep_seeds=[0, 1],
            sweep=[(0.1, 0.5)],
            iqem=IqemConfig(enabled=True, steps=1, batch_size=2, seed=0),
        )
    if own.seeds is not None:
        p["seeds"] = list(range(own.seeds))
    if own.sweep is not None:
        p["sweep"] = (
            [] if own.sweep == "none" else [tuple(float(v) for v in pair.split(":")) for pair in own.sweep.split(",")]
        )
    if own.sweep_seeds is not None:
        p["sweep_seeds"] = list(range(own.sweep_seeds))
    if own.attack_steps is not None:
        p["attack"] = TrainSettings(**{**p["attack"].__dict__, "steps": own.attack_steps})
    if own.sweep_attack_steps is not None:
        p["attack_sweep"] = TrainSettings(**{**p["attack_sweep"].__dict__, "steps": own.sweep_attack_steps})
    batches = [int(v) for v in (own.speed_batch or ("8" if quick else "8,16,32")).split(",")]
    if own.only == "speed":
        speed, only_keys = speed_rows(own, batches=batches, repeat=own.speed_repeat, cuda=device == "cuda")
        print_table(speed, only_keys)
        write_json(args.json, speed, only_keys, settings={"only": "speed", "threads": own.threads})
        return
    rng = np.random.default_rng(0)
    rows: list[dict[str, object]] = []
    t_start = time.perf_counter()

    # ---- data --------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    if own.data is not None:
        sites, public = load_data(own.data)
    else:
        sites = make_sites(
            3,
            p["n_scans"],
            p["n_slices"],
            own.grid,
            crop=crop,
            crops_per_slice=p["crops_per_slice"],
            seed=1,
        )
        public = public_crops(p["public"], own.grid, crop, rng=rng)
    if own.save_data is not None:
        save_data(own.save_data, sites, public)
        print(f"data written to {own.save_data}")
        return
    if own.only == "sweep":
        sweep_only(own, args, sites, public, p, rng)
        return
    test_labels = np.concatenate([s.labels[s.scan == s.scan.max()] for s in sites])
    print(
        f"data: {sum(len(s.private) for s in sites)} crops of {crop}² from {own.grid}² slices "
        f"({sum(int(s.labels.sum()) for s in sites)} positive; test {len(test_labels)}, {int(test_labels.sum())} "
        f"positive), {len(public)} public crops ({time.perf_counter() - t0:.1f} s)",
        flush=True,
    )

    # ---- privacy at the default, on the shared crops ------------------------------------------------
    alpha, beta = 0.1, 0.5
    case = f"default a={alpha:g} b={beta:g}"
    configs = {s.site_id: site_config(s, alpha=alpha, beta=beta) for s in sites}
    surr = {s.site_id: surrogates_of(s, configs[s.site_id]) for s in sites}
    private_all = np.concatenate([s.private for s in sites])
    surr_all = np.concatenate([surr[s.site_id] for s in sites])
    psnr, ssim = image_metrics(private_all, surr_all)
    rows.append({"case": case, "method": f"surrogate-vs-private ({crop}² crops)", "psnr_db": psnr, "ssim": ssim})
    surrogate_ssim = ssim
    slice_ref, slice_surr = [], []
    for s in sites:  # the slice-level row: whole slices hidden with the site's host at the slice size
        from tasks.surrogate.kernels import to_unit_range

        slice_ref.append(to_unit_range(s.slice_mu, unit="per_mm", water_attenuation_per_mm=s.water))
        slice_surr.append(surrogates_of(Site(**{**s.__dict__, "mu": s.slice_mu}), configs[s.site_id]))
    psnr, ssim = image_metrics(np.concatenate(slice_ref), np.concatenate(slice_surr))
    rows.append({"case": case, "method": f"surrogate-vs-private ({own.grid}² slices)", "psnr_db": psnr, "ssim": ssim})
    shape = (crop, crop)
    pool = np.stack([np.array(load_host(n, shape)) for n in HOST_NAMES])
    hits = []
    for s in sites:
        idx, _ = site_host(s, shape, configs[s.site_id])
        hits.append(identify_hosts(surr[s.site_id], pool, alpha=alpha) == idx)
    host_id_rate = float(np.concatenate(hits).mean())
    rows.append({"case": case, "method": "host-identification", "rate": host_id_rate, "pool": len(HOST_NAMES)})
    attacks = attack_rows(
        sites,
        surr,
        alpha=alpha,
        beta=beta,
        public=public,
        settings=p["attack"],
        rng=rng,
        rows=rows,
        case=case,
        convergence=True,
    )
    surr0 = {s.site_id: surrogates_of(s, site_config(s, alpha=0.0, beta=beta)) for s in sites}
    floor = attack_rows(
        sites,
        surr0,
        alpha=0.0,
        beta=beta,
        public=public,
        settings=p["attack"],
        rng=rng,
        rows=rows,
        case="prior floor a=0 (nothing embedded)",
        known_only=True,
    )
    print(f"privacy done ({time.perf_counter() - t_start:.0f} s)", flush=True)

    # ---- IQEM --------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    surr_iqem, host_like = {}, []
    dev = torch.device(device)
    for s in sites:
        _, host = site_host(s, shape, configs[s.site_id])
        result = train_iqem(surr[s.site_id], host, config=p["iqem"], device=dev)
        cfg = site_config(s, alpha=alpha, beta=beta, iqem=p["iqem"])
        surr_iqem[s.site_id] = surrogates_of(s, cfg, generator=result.generator, device=device)
        host_like.append(
            (
                image_metrics(np.broadcast_to(host, surr[s.site_id].shape), surr[s.site_id])[0],
                image_metrics(np.broadcast_to(host, surr[s.site_id].shape), surr_iqem[s.site_id])[0],
            )
        )
    iqem_s = (time.perf_counter() - t0) / len(sites)
    psnr, ssim = image_metrics(private_all, np.concatenate([surr_iqem[s.site_id] for s in sites]))
    rows.append({"case": case, "method": "iqem-surrogate-vs-private", "psnr_db": psnr, "ssim": ssim, "train_s": iqem_s})
    hl = np.mean(host_like, axis=0)
    rows.append({"case": case, "method": "surrogate-vs-host", "psnr_db": float(hl[0])})
    rows.append({"case": case, "method": "iqem-surrogate-vs-host", "psnr_db": float(hl[1])})
    print(f"iqem done ({time.perf_counter() - t_start:.0f} s)", flush=True)

    # ---- utility -----------------------------------------------------------------------------------
    util: dict[str, dict[str, Any]] = {}
    per_seed: dict[str, list[float]] = {}
    plain_aucs: list[float] | None = None
    for name, images in (
        ("plaintext", {s.site_id: s.private for s in sites}),
        ("surrogate", surr),
        ("surrogate+iqem", surr_iqem),
    ):
        t0 = time.perf_counter()
        util[name], aucs = utility(sites, images, seeds=p["seeds"], settings=p["clf"], plain_aucs=plain_aucs)
        per_seed[name] = aucs
        if plain_aucs is None:
            plain_aucs = aucs
        rows.append(
            {
                "case": "utility",
                "method": name,
                **util[name],
                "seeds": len(p["seeds"]),
                "n_train": sum(int((s.scan < s.scan.max()).sum()) for s in sites),
                "n_test": len(test_labels),
                "train_s": time.perf_counter() - t0,
            }
        )
        print(f"utility {name} done ({time.perf_counter() - t_start:.0f} s)", flush=True)
    plain_auc = float(util["plaintext"]["auc"])

    # ---- sweep -------------------------------------------------------------------------------------
    if p["sweep"]:
        seed_auc = dict(zip(p["seeds"], plain_aucs or [], strict=True))
        if all(k in seed_auc for k in p["sweep_seeds"]):  # the same seeds: reuse the plaintext runs
            sweep_plain = [seed_auc[k] for k in p["sweep_seeds"]]
        else:
            sweep_plain = utility(
                sites, {s.site_id: s.private for s in sites}, seeds=p["sweep_seeds"], settings=p["clf"]
            )[1]
        points = sweep_points(sites, public, p, rng, rows, t_start, plain_aucs=sweep_plain)
    else:
        points = []
    unprot = min(attacks["unprotected"][0], UNPROTECTED_CAP_DB)
    recommendation = recommend(points, unprot=unprot, plain_auc=plain_auc) if points else None
    if own.png is not None and points:
        draw_tradeoff_png(
            points, own.png, reference={"attack_psnr_db": unprot, "auc": plain_auc}, note=_png_note(p, own)
        )

    # ---- speed -------------------------------------------------------------------------------------
    speed_keys: dict[str, float] = {}  # --no-speed: the keys are left out, not written as NaN
    if not own.no_speed:
        speed, speed_keys = speed_rows(
            own,
            batches=[2] if own.smoke else batches,
            repeat=1 if own.smoke else 2 if quick else own.speed_repeat,
            cuda=device == "cuda",
        )
        rows += speed

    # ---- a user image ------------------------------------------------------------------------------
    if args.image is not None:
        from tasks.surrogate.chunked import surrogate_slices
        from tasks.surrogate.kernels import to_unit_range

        mu = np.load(args.image).astype(np.float32)
        if mu.ndim != 2:
            raise SystemExit(f"--image must be a 2-D attenuation image, got shape {mu.shape}")
        cfg = site_config(sites[0], alpha=alpha, beta=beta)
        s_img = surrogate_slices(mu[None], config=cfg, site_id="A")
        psnr, ssim = image_metrics(to_unit_range(mu[None], unit="per_mm"), s_img)
        rows.append(
            {
                "case": f"image {args.image.name} ({mu.shape[0]}x{mu.shape[1]}, {args.pixel_mm} mm)",
                "method": "surrogate-vs-private",
                "psnr_db": psnr,
                "ssim": ssim,
            }
        )

    ratios = {
        "attack_psnr_drop_db": unprot - attacks["known"][0],
        "attack_psnr_drop_db_pool_attacker": unprot - attacks["pool"][0],
        "attack_gain_over_prior_db": attacks["known"][0] - floor["known"][0],
        "attack_pool_gain_over_prior_db": attacks["pool"][0] - floor["known"][0],
        "surrogate_ssim": surrogate_ssim,
        "auc_drop_vs_plaintext": util["surrogate"]["auc_drop"],
        "auc_drop_vs_plaintext_ci95": util["surrogate"]["auc_drop_ci95"],
        "auc_drop_vs_plaintext_iqem": util["surrogate+iqem"]["auc_drop"],
        "auc_drop_vs_plaintext_iqem_ci95": util["surrogate+iqem"]["auc_drop_ci95"],
        **speed_keys,
        "host_identification_rate": host_id_rate,
    }
    print_table(rows, ratios)
    print(
        f"utility target (drop < {AUC_DROP_BOUND}): surrogate {util['surrogate']['verdict']}, "
        f"surrogate+iqem {util['surrogate+iqem']['verdict']}"
    )
    print(f"recommended (attack drop >= 10 dB and SSIM < 0.3, then smallest AUC drop): {recommendation}")
    print(f"total {time.perf_counter() - t_start:.0f} s")
    write_json(
        args.json,
        rows,
        ratios,
        sweep=points,
        recommendation=recommendation,
        verdicts={k: util[k]["verdict"] for k in ("surrogate", "surrogate+iqem")},
        auc_per_seed=per_seed,
        settings=_settings_record(own, args, p),
    )


if __name__ == "__main__":
    main()
