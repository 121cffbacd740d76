"""Continual learning over simulated nights: a frozen first model, nightly retraining from scratch, warm-started
continual training, and warm start + local fine-tuning; and diagnosis throughput against the surrogate stage.

Data: the lesion crop task of ``benchmarks/federated.py`` (demo sites A, B, C with the crop task's lesions,
``benchmarks._crops``), but every scan goes through the demo's acquisition
(:func:`tasks.demo.generate.iter_scan_blocks`: the site's geometry, photons and detector noise), fedscan's FBP
(Hann, the reconstruct stage's default; no denoise stage) and the FESF surrogate stage's block function
(:func:`tasks.surrogate.chunked.surrogate_slices`, the site's fixed secret host) on ``--crop``² crops of the
reconstructed ``--grid``² slices; labels come from the exact masks.

Each night every site gets ``--scans-per-night`` new labelled scans. From night ``--shift-night`` on, site
``--shift-site`` scans with another protocol (``--shift dose``: photons per view × ``--shift-factor``;
``--shift fov``: display field of view × ``--shift-factor``, i.e. smaller pixels and larger lesions in pixels).
Each site also has ``--test-scans`` first-night test scans (night-0 protocol) that nobody trains on.

Training: after night ``t`` every arm has the labelled crops of nights ``0..t`` of every site.

* ``frozen``: the night-0 model (``scratch`` of night 0), never updated (its BatchNorm statistics too);
* ``scratch``: FedAvg from a fresh initialisation, ``--rounds`` × ``--epochs`` on all data so far;
* ``warm``: FedAvg from the previous night's global model, ``--warm-rounds`` × ``--warm-epochs`` on **all data
  so far** (full replay of earlier nights, no sampling), learning rate ``--warm-lr``; night 0 is ``scratch``'s;
* ``personalised``: ``warm``'s global model fine-tuned at each site on its own data so far
  (:func:`tasks.federated.continual.finetune_local`, ``--finetune-epochs`` at ``--finetune-lr``); kept at the site,
  the next night's federated training starts from the global model again.

FedAvg here is an in-process loop, **not Flower**: each round every site trains from the global weights with
:func:`tasks.federated.training.train_local` (fresh Adam, the ClientApp's call) and the updates are averaged
weighted by examples with :func:`tasks.enhance.fit.average_states`. BatchNorm follows fedscan's default (local
statistics, SiloBN): the learnt scale and shift are averaged, the running statistics are not; each site
re-estimates them on its own training crops before scoring (:func:`tasks.federated.training.recalibrate_batchnorm`),
as the ClientApp does. The frozen arm keeps its night-0 statistics.

Scores: after night ``t`` each site's model (global weights + site statistics, or the personalised model) scores
the site's night ``t + 1`` scans (its *future*: they arrive after the model was trained) and the first-night test
scans. AUC is the mean over ``--seeds`` training seeds; 95 % intervals come from a class-stratified bootstrap of
the test crops, two-level (seeds drawn with replacement too), with the same resamples for every arm (paired).
Compute per night: optimizer steps × batch size (examples processed; the primary measure) and wall seconds.

Ratio keys (issue 23): ``auc_warm_minus_scratch`` (mean over nights 1..N-1 of the pooled-site future AUC difference;
night 0 is the same model), ``compute_warm_vs_scratch`` (steps × batch summed over nights 1..N-1),
``auc_personalised_minus_global`` (the worst site; ``_by_site`` each, mean over all nights of the site's future AUC,
personalised minus warm global), ``auc_forgetting`` (warm arm: pooled first-night-test AUC after night 0 minus after
the last night; positive = forgotten), ``diagnose_slices_per_s`` (the diagnose stage's kernel,
:func:`~tasks.diagnose.kernels.score_slices` with :func:`~tasks.diagnose.kernels.inference_model`, of the last warm
model on ``--speed-size``² surrogate slices, batch ``--speed-batch``; ``diagnose_unoptimised_slices_per_s`` is the
training code's batched :func:`~tasks.federated.training.predict` of the same model), ``surrogate_slices_per_s``
(:func:`~tasks.surrogate.chunked.surrogate_slices` on the same slices: the stage's block function, unit mapping,
host and hiding) and ``diagnose_vs_surrogate_throughput``; the bare ``hide`` kernel is a second peer. The classifier
learnt crops of ``--grid``² slices (about 3 mm pixels), so ``diagnose_resampled_slices_per_s`` also times the same
surrogates area-averaged to ``--grid``² first (the same field of view at the training pixel size), resampling
included.

``--throughput-only`` skips the nights and times a freshly initialised classifier of the same width (the
weights do not change the cost).

Torch runs on ``--threads`` threads (default 1, as ``benchmarks/federated.py``: OpenMP threads wait on each other
on the shared 2-core VM).

    python benchmarks/continual.py --quick --json out.json
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import parse_args, print_table, write_json
from benchmarks._crops import LESION_CONTRAST_HU, LESION_RADIUS_MM, crop_centres, cut_crops
from schemas.demo import SiteProfile, default_sites
from schemas.surrogate import SurrogateConfig
from tasks.demo.generate import iter_scan_blocks, plan_scan
from tasks.diagnose.kernels import inference_model, score_slices
from tasks.enhance.fit import average_states
from tasks.federated.continual import finetune_local, warm_start_model
from tasks.federated.model import build_model, shared_keys
from tasks.federated.training import (
    auc_score,
    bootstrap_aucs,
    bootstrap_indices,
    bootstrap_seed_draws,
    percentile_ci,
    predict,
    recalibrate_batchnorm,
    train_local,
)
from tasks.reconstruct.kernels import fbp
from tasks.surrogate.chunked import surrogate_slices

CPU = torch.device("cpu")
ARMS = ("frozen", "scratch", "warm", "personalised")
DATA_SEED = 23
#: Night index of the first-night test scans' random streams (never a training night).
TEST_NIGHT_KEY = 10_000

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Settings:
    sites: int
    nights: int
    scans_per_night: int
    test_scans: int
    slices: int
    grid: int
    crop: int
    crops_per_slice: int
    rounds: int
    epochs: int
    warm_rounds: int
    warm_epochs: int
    finetune_epochs: int
    learning_rate: float
    warm_lr: float
    finetune_lr: float
    batch_size: int
    base_channels: int
    seeds: int
    boot: int
    shift: str
    shift_site: str
    shift_night: int
    shift_factor: float
    speed_batch: int
    speed_size: int


@dataclass(frozen=True)
class Crops:
    """Surrogate crops ``(n, crop, crop)`` float32 and their labels ``(n,)`` uint8."""

    images: npt.NDArray[np.float32]
    labels: npt.NDArray[np.uint8]

    @staticmethod
    def concat(parts: Sequence[Crops]) -> Crops:
        return Crops(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]))


# ---- data ----------------------------------------------------------------------------------------------
def crop_task_profile(profile: SiteProfile) -> SiteProfile:
    """The site with the crop task's lesions (its own polarity), half the slices with a lesion."""
    sign = 1.0 if profile.lesion_contrast_hu[1] > 0 else -1.0
    return SiteProfile.model_validate(
        {
            **profile.model_dump(),
            "lesion_radius_mm": LESION_RADIUS_MM,
            "lesion_contrast_hu": tuple(sorted(sign * c for c in LESION_CONTRAST_HU)),
            "lesion_prevalence_fraction": 0.5,
        }
    )


def protocol_shift(profile: SiteProfile, *, kind: str, factor: float) -> SiteProfile:
    """The site after its scanner protocol changed: photons per view (``dose``) or display field of view
    (``fov``) times ``factor``."""
    if kind == "dose":
        update: dict[str, Any] = {"i0_photons": profile.i0_photons * factor}
    elif kind == "fov":
        update = {"display_fov_mm": profile.display_fov_mm * factor}
    else:
        raise ValueError(f"shift must be 'dose' or 'fov', got {kind!r}")
    return SiteProfile.model_validate({**profile.model_dump(), **update, "description": f"{kind} x {factor:g}"})


def scan_crops(
    profile: SiteProfile,
    *,
    rng_key: Sequence[int],
    n_slices: int,
    grid: int,
    crop: int,
    per_slice: int,
    first_slice: int,
) -> Crops:
    """One demo scan acquired with ``profile``, reconstructed (FBP, Hann), cropped and hidden (FESF)."""
    plan = plan_scan(profile, n_slices=n_slices, grid=profile.grid(grid), rng=np.random.default_rng(list(rng_key)))
    (block,) = iter_scan_blocks(plan, block_slices=n_slices)
    with warnings.catch_warnings():  # a fan-beam grid corner outside the detector is expected here
        warnings.simplefilter("ignore", UserWarning)
        rec = np.asarray(
            fbp(np.ascontiguousarray(block.projections.transpose(1, 0, 2)), plan.geometry, filter_name="hann")
        )
    water = profile.water_attenuation_per_mm
    centres = crop_centres(
        block.masks,
        block.volume_truth > 0.5 * water,
        crop=crop,
        per_slice=per_slice,
        rng=np.random.default_rng([*rng_key, 1]),
    )
    masks = cut_crops(block.masks, centres, crop=crop)
    labels = np.asarray(masks.reshape(len(centres), -1).any(axis=1), dtype=np.uint8)
    config = SurrogateConfig(input_unit="per_mm", water_attenuation_per_mm=water)
    images = surrogate_slices(
        cut_crops(rec, centres, crop=crop), config=config, site_id=profile.site_id, first_slice=first_slice
    )
    return Crops(images, labels)


@dataclass(frozen=True)
class Nights:
    """``new[t][k]``: site ``k``'s new crops of night ``t`` (``t = 0..nights``; the last is test only);
    ``first_test[k]``: its first-night test crops."""

    site_ids: list[str]
    new: list[list[Crops]]
    first_test: list[Crops]

    def so_far(self, night: int, site: int) -> Crops:
        return Crops.concat([self.new[t][site] for t in range(night + 1)])


def build_nights(s: Settings) -> Nights:
    profiles = [crop_task_profile(p) for p in default_sites(s.sites)]
    ids = [p.site_id for p in profiles]
    if s.shift_site not in ids:
        raise ValueError(f"--shift-site {s.shift_site!r} is not one of the sites {ids}")
    per_scan = s.slices * s.crops_per_slice
    kw = {"n_slices": s.slices, "grid": s.grid, "crop": s.crop, "per_slice": s.crops_per_slice}
    new: list[list[Crops]] = []
    for night in range(s.nights + 1):
        row = []
        for k, base in enumerate(profiles):
            shifted = base.site_id == s.shift_site and night >= s.shift_night
            p = protocol_shift(base, kind=s.shift, factor=s.shift_factor) if shifted else base
            scans = [
                scan_crops(
                    p,
                    rng_key=[DATA_SEED, k, night, j],
                    first_slice=(night * s.scans_per_night + j) * per_scan,
                    **kw,
                )
                for j in range(s.scans_per_night)
            ]
            row.append(Crops.concat(scans))
        new.append(row)
    first_test = [
        Crops.concat(
            [
                scan_crops(
                    p,
                    rng_key=[DATA_SEED, k, TEST_NIGHT_KEY, j],
                    first_slice=(TEST_NIGHT_KEY + j) * per_scan,
                    **kw,
                )
                for j in range(s.test_scans)
            ]
        )
        for k, p in enumerate(profiles)
    ]
    return Nights(ids, new, first_test)


# ---- training ------------------------------------------------------------------------------------------
def _generator(*key: int) -> torch.Generator:
    state = np.random.SeedSequence(list(key)).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


def initial_state(s: Settings, seed: int) -> State:
    model = build_model("classify", base_channels=s.base_channels, seed=seed)
    keys = shared_keys(model, fedbn=False, local_statistics=True)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in keys}


def fedavg(
    state: State, data: Sequence[Crops], s: Settings, *, rounds: int, epochs: int, lr: float, key: Sequence[int]
) -> tuple[State, int]:
    """``rounds`` FedAvg rounds from ``state`` over the sites' ``data``; the new shared state and the examples
    processed (optimizer steps × batch size, all sites and rounds)."""
    examples = 0
    for r in range(rounds):
        updates, weights = [], []
        for k, d in enumerate(data):
            model = warm_start_model(state, task="classify", base_channels=s.base_channels)
            stats = train_local(
                model,
                d.images,
                d.labels,
                task="classify",
                epochs=epochs,
                learning_rate=lr,
                batch_size=s.batch_size,
                generator=_generator(*key, r, k),
                device=CPU,
            )
            examples += stats.steps * s.batch_size
            new = model.state_dict()
            updates.append({name: new[name].detach().clone() for name in state})
            weights.append(float(stats.num_examples))
        state = average_states(updates, weights)
    return state, examples


def site_model(state: State, train: Crops, s: Settings) -> torch.nn.Module:
    """The global weights with BatchNorm statistics re-estimated on the site's training crops."""
    model = warm_start_model(state, task="classify", base_channels=s.base_channels)
    recalibrate_batchnorm(model, train.images, batch_size=max(s.batch_size, 2), device=CPU)
    return model


@dataclass
class SeedRun:
    """One seed's scores: ``future[arm][t][k]``, ``first[arm][t][k]``; ``examples[arm][t]``, ``seconds[arm][t]``."""

    future: dict[str, list[list[npt.NDArray[np.float32]]]]
    first: dict[str, list[list[npt.NDArray[np.float32]]]]
    examples: dict[str, list[int]]
    seconds: dict[str, list[float]]
    last_warm: State


def run_seed(data: Nights, s: Settings, seed: int, log: Callable[[str], None]) -> SeedRun:
    n_sites = len(data.site_ids)
    run = SeedRun(
        future={a: [] for a in ARMS},
        first={a: [] for a in ARMS},
        examples={a: [] for a in ARMS},
        seconds={a: [] for a in ARMS},
        last_warm={},
    )

    def score(arm: str, models: Sequence[torch.nn.Module], night: int) -> None:
        fut = data.new[night + 1]
        run.future[arm].append([predict(m, fut[k].images, batch_size=64, device=CPU) for k, m in enumerate(models)])
        run.first[arm].append(
            [predict(m, data.first_test[k].images, batch_size=64, device=CPU) for k, m in enumerate(models)]
        )

    frozen_models: list[torch.nn.Module] = []
    warm: State = {}
    for night in range(s.nights):
        so_far = [data.so_far(night, k) for k in range(n_sites)]
        t0 = time.perf_counter()
        scratch, ex_scratch = fedavg(
            initial_state(s, seed),
            so_far,
            s,
            rounds=s.rounds,
            epochs=s.epochs,
            lr=s.learning_rate,
            key=(seed, night, 0),
        )
        t_scratch = time.perf_counter() - t0
        if night == 0:
            warm, ex_warm, t_warm = scratch, ex_scratch, t_scratch
            frozen_models = [site_model(scratch, so_far[k], s) for k in range(n_sites)]
        else:
            t0 = time.perf_counter()
            warm, ex_warm = fedavg(
                warm,
                so_far,
                s,
                rounds=s.warm_rounds,
                epochs=s.warm_epochs,
                lr=s.warm_lr,
                key=(seed, night, 1),
            )
            t_warm = time.perf_counter() - t0
        warm_models = [site_model(warm, so_far[k], s) for k in range(n_sites)]
        t0 = time.perf_counter()
        personal, ex_fine = [], 0
        for k in range(n_sites):
            m = site_model(warm, so_far[k], s)
            stats = finetune_local(
                m,
                so_far[k].images,
                so_far[k].labels,
                task="classify",
                epochs=s.finetune_epochs,
                learning_rate=s.finetune_lr,
                batch_size=s.batch_size,
                generator=_generator(seed, night, 2, k),
                device=CPU,
            )
            ex_fine += stats.steps * s.batch_size
            personal.append(m)
        t_fine = time.perf_counter() - t0
        score("frozen", frozen_models, night)
        score("scratch", [site_model(scratch, so_far[k], s) for k in range(n_sites)], night)
        score("warm", warm_models, night)
        score("personalised", personal, night)
        for arm, ex, sec in (
            ("frozen", 0 if night else ex_scratch, 0.0 if night else t_scratch),
            ("scratch", ex_scratch, t_scratch),
            ("warm", ex_warm, t_warm),
            ("personalised", ex_warm + ex_fine, t_warm + t_fine),
        ):
            run.examples[arm].append(ex)
            run.seconds[arm].append(sec)
        pooled = {
            arm: auc_score(np.concatenate(run.future[arm][-1]), np.concatenate([d.labels for d in data.new[night + 1]]))
            for arm in ARMS
        }
        log(
            f"seed {seed} night {night}: future AUC "
            + " ".join(f"{a} {v:.3f}" for a, v in pooled.items())
            + f"; examples scratch {ex_scratch} warm {ex_warm} fine-tune {ex_fine}; "
            f"s scratch {t_scratch:.1f} warm {t_warm:.1f} fine-tune {t_fine:.1f}"
        )
    run.last_warm = warm
    return run


# ---- statistics ----------------------------------------------------------------------------------------
@dataclass
class Boot:
    """Paired bootstrap of one test set: ``labels``, resample ``indices`` (None when a class is absent)."""

    labels: npt.NDArray[np.uint8]
    indices: npt.NDArray[np.intp] | None


def make_boot(labels: npt.NDArray[np.uint8], *, n_boot: int, seed: int) -> Boot:
    has_both = 0 < int(labels.sum()) < labels.size
    return Boot(labels, bootstrap_indices(labels, n_boot=n_boot, seed=seed) if has_both else None)


def auc_with_ci(
    score_sets: Sequence[npt.ArrayLike], boot: Boot, draws: npt.NDArray[np.intp], n_boot: int
) -> tuple[float, list[float], npt.NDArray[np.float64]]:
    """Seed-mean AUC, its 95 % interval (seeds and crops resampled) and the bootstrap samples (NaN: no AUC)."""
    if boot.indices is None:
        return float("nan"), [float("nan"), float("nan")], np.full(n_boot, np.nan)
    mean = float(np.mean([auc_score(sc, boot.labels) for sc in score_sets]))
    samples = bootstrap_aucs(list(score_sets), boot.labels, boot.indices, seed_draws=draws)
    return mean, list(percentile_ci(samples)), samples


def mean_difference(pairs: list[tuple[float, npt.NDArray[np.float64]]]) -> tuple[float, list[float]]:
    """Mean of differences (value, bootstrap samples) over nights, with the interval of the mean (NaN nights
    skipped)."""
    kept = [(v, b) for v, b in pairs if np.isfinite(v)]
    if not kept:
        return float("nan"), [float("nan"), float("nan")]
    value = float(np.mean([v for v, _ in kept]))
    samples = np.mean(np.stack([b for _, b in kept]), axis=0)
    return value, list(percentile_ci(samples))


def analyse(
    data: Nights, runs: list[SeedRun], s: Settings
) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, list[float]]]:
    n_sites = len(data.site_ids)
    draws = bootstrap_seed_draws(len(runs), n_boot=s.boot, seed=54321)
    names = [*data.site_ids, "pooled"]
    future_boot = [
        [make_boot(data.new[t + 1][k].labels, n_boot=s.boot, seed=1000 * t + k) for k in range(n_sites)]
        + [make_boot(np.concatenate([d.labels for d in data.new[t + 1]]), n_boot=s.boot, seed=1000 * t + 999)]
        for t in range(s.nights)
    ]
    first_boot = [make_boot(d.labels, n_boot=s.boot, seed=77 + k) for k, d in enumerate(data.first_test)]
    first_boot.append(make_boot(np.concatenate([d.labels for d in data.first_test]), n_boot=s.boot, seed=777))

    def sets(kind: str, arm: str, t: int, j: int) -> list[npt.NDArray[np.float32]]:
        runs_of = [r.future if kind == "future" else r.first for r in runs]
        if j < n_sites:
            return [f[arm][t][j] for f in runs_of]
        return [np.concatenate(f[arm][t]) for f in runs_of]

    rows: list[dict[str, Any]] = []
    fut: dict[tuple[str, int, int], tuple[float, npt.NDArray[np.float64]]] = {}
    first: dict[tuple[str, int, int], tuple[float, npt.NDArray[np.float64]]] = {}
    for t in range(s.nights):
        for arm in ARMS:
            examples = float(np.mean([r.examples[arm][t] for r in runs]))
            seconds = float(np.mean([r.seconds[arm][t] for r in runs]))
            for j, name in enumerate(names):
                a, ci_f, b = auc_with_ci(sets("future", arm, t, j), future_boot[t][j], draws, s.boot)
                a1, ci1, b1 = auc_with_ci(sets("first", arm, t, j), first_boot[j], draws, s.boot)
                fut[arm, t, j], first[arm, t, j] = (a, b), (a1, b1)
                shifted = name == s.shift_site and t + 1 >= s.shift_night
                rows.append(
                    {
                        "night": t,
                        "arm": arm,
                        "site": name,
                        "auc_future": a,
                        "auc_future_ci95": ci_f,
                        "future_crops": int(future_boot[t][j].labels.size),
                        "future_positives": int(future_boot[t][j].labels.sum()),
                        "future_shifted": bool(shifted),
                        "auc_first_night": a1,
                        "auc_first_night_ci95": ci1,
                        "train_examples": examples if name == "pooled" else None,
                        "train_s": seconds if name == "pooled" else None,
                    }
                )
    pooled = n_sites
    later = range(1, s.nights)

    def diff(
        table: dict[tuple[str, int, int], tuple[float, npt.NDArray[np.float64]]],
        arm: str,
        other: str,
        t: int,
        j: int,
        t_other: int | None = None,
    ) -> tuple[float, npt.NDArray[np.float64]]:
        (a, b), (a0, b0) = table[arm, t, j], table[other, t if t_other is None else t_other, j]
        return a - a0, b - b0

    ratios: dict[str, Any] = {}
    ci: dict[str, list[float]] = {}
    ratios["auc_warm_minus_scratch"], ci["auc_warm_minus_scratch"] = mean_difference(
        [diff(fut, "warm", "scratch", t, pooled) for t in later]
    )
    ratios["auc_warm_minus_frozen"], ci["auc_warm_minus_frozen"] = mean_difference(
        [diff(fut, "warm", "frozen", t, pooled) for t in later]
    )
    ratios["auc_scratch_minus_frozen"], ci["auc_scratch_minus_frozen"] = mean_difference(
        [diff(fut, "scratch", "frozen", t, pooled) for t in later]
    )
    total = {arm: sum(float(np.mean([r.examples[arm][t] for r in runs])) for t in later) for arm in ARMS}
    ratios["compute_warm_vs_scratch"] = total["warm"] / total["scratch"] if total["scratch"] else float("nan")
    ratios["compute_personalised_vs_scratch"] = (
        total["personalised"] / total["scratch"] if total["scratch"] else float("nan")
    )
    wall = {arm: sum(float(np.mean([r.seconds[arm][t] for r in runs])) for t in later) for arm in ARMS}
    ratios["wall_warm_vs_scratch"] = wall["warm"] / wall["scratch"] if wall["scratch"] else float("nan")
    by_site: dict[str, float] = {}
    for k, site in enumerate(data.site_ids):
        by_site[site], ci[f"auc_personalised_minus_global_{site}"] = mean_difference(
            [diff(fut, "personalised", "warm", t, k) for t in range(s.nights)]
        )
    finite = [v for v in by_site.values() if np.isfinite(v)]
    ratios["auc_personalised_minus_global"] = min(finite) if finite else float("nan")
    ratios["auc_personalised_minus_global_by_site"] = by_site
    last = s.nights - 1
    for arm, key in (
        ("warm", "auc_forgetting"),
        ("scratch", "auc_forgetting_scratch"),
        ("personalised", "auc_forgetting_personalised"),
    ):  # first-night test AUC after night 0 minus after the last night (positive: forgotten)
        ratios[key], ci[key] = mean_difference([diff(first, arm, arm, 0, pooled, t_other=last)])
    return rows, ratios, ci


def verdicts(ratios: dict[str, Any], ci: dict[str, list[float]], site_ids: Sequence[str]) -> dict[str, str]:
    """Each issue-23 target: ``met`` when the whole 95 % interval is on the right side of the bound, ``missed``
    when it is wholly on the wrong side, ``undecided`` otherwise (a ratio without an interval: its value decides)."""

    def at_least(interval: Sequence[float], bound: float) -> str:
        lo, hi = interval
        if not (np.isfinite(lo) and np.isfinite(hi)):
            return "undecided"
        return "met" if lo >= bound else "missed" if hi < bound else "undecided"

    sites = [at_least(ci[f"auc_personalised_minus_global_{k}"], 0.0) for k in site_ids]
    lo, hi = ci["auc_forgetting"]
    forgetting = at_least((-hi, -lo), -0.02)  # forgetting <= 0.02  <=>  -forgetting >= -0.02
    compute = float(ratios["compute_warm_vs_scratch"])
    speed = float(ratios["diagnose_vs_surrogate_throughput"])
    return {
        "auc_warm_minus_scratch_at_least_-0.01": at_least(ci["auc_warm_minus_scratch"], -0.01),
        "compute_warm_vs_scratch_at_most_0.35": "met" if compute <= 0.35 else "missed",
        "auc_personalised_minus_global_at_least_0_every_site": (
            "missed" if "missed" in sites else "met" if all(v == "met" for v in sites) else "undecided"
        ),
        "auc_forgetting_at_most_0.02": forgetting,
        "diagnose_vs_surrogate_throughput_at_least_1": "met" if speed >= 1 else "missed",
    }


# ---- throughput ----------------------------------------------------------------------------------------
def resample(images: npt.NDArray[np.float32], size: int) -> npt.NDArray[np.float32]:
    """``(n, H, W)`` slices area-averaged to ``(n, size, size)``."""
    x = torch.nn.functional.interpolate(torch.from_numpy(images).unsqueeze(1), size=(size, size), mode="area")
    return np.asarray(x.squeeze(1).numpy(), dtype=np.float32)


def throughput(model: torch.nn.Module, s: Settings, *, repeat: int = 3) -> dict[str, float]:
    """Slices per second on ``speed_size``² slices, batch ``speed_batch``: the surrogate stage's block function,
    the bare ``hide`` kernel and the diagnostic model's batched predict on the surrogates, alternated in the same
    stretch of time; each keeps its fastest call."""
    from tasks.surrogate.hosts import hosts_for_slices
    from tasks.surrogate.kernels import hide, to_unit_range

    water = 0.0192
    config = SurrogateConfig(input_unit="per_mm", water_attenuation_per_mm=water)
    rng = np.random.default_rng(5)
    n, size = s.speed_batch, s.speed_size
    x = (water * (0.5 + rng.random((n, size, size)))).astype(np.float32)
    surrogates = surrogate_slices(x, config=config, site_id="A", first_slice=0)
    private = torch.from_numpy(to_unit_range(x, unit="per_mm", water_attenuation_per_mm=water))
    hosts = hosts_for_slices(
        np.arange(n),
        shape=(size, size),
        policy=config.host_policy,
        seed=config.host_seed,
        site_id="A",
        pool=config.host_pool,
    )
    fast = inference_model(model)
    fns = {
        "surrogate": lambda: surrogate_slices(x, config=config, site_id="A", first_slice=0),
        "hide_kernel": lambda: hide(private, hosts, alpha=config.alpha, beta=config.beta),
        "diagnose": lambda: score_slices(fast, surrogates, batch_size=n, device=CPU),
        "diagnose_unoptimised": lambda: predict(model, surrogates, batch_size=n, device=CPU),
        # the classifier learnt crops of --grid² slices: the same slices resampled to that pixel size first
        "diagnose_resampled": lambda: score_slices(fast, resample(surrogates, s.grid), batch_size=n, device=CPU),
    }
    best = dict.fromkeys(fns, float("inf"))
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: n / sec for name, sec in best.items()}


def throughput_ratios(speed: dict[str, float]) -> dict[str, float]:
    """The throughput ratio keys of :func:`throughput`'s slices per second."""
    return {
        "diagnose_slices_per_s": speed["diagnose"],
        "surrogate_slices_per_s": speed["surrogate"],
        "hide_kernel_slices_per_s": speed["hide_kernel"],
        "diagnose_vs_surrogate_throughput": speed["diagnose"] / speed["surrogate"],
        "diagnose_vs_hide_kernel_throughput": speed["diagnose"] / speed["hide_kernel"],
        "diagnose_unoptimised_slices_per_s": speed["diagnose_unoptimised"],
        "diagnose_vs_unoptimised_speedup": speed["diagnose"] / speed["diagnose_unoptimised"],
        "diagnose_resampled_slices_per_s": speed["diagnose_resampled"],
        "diagnose_resampled_vs_surrogate_throughput": speed["diagnose_resampled"] / speed["surrogate"],
    }


# ---- main ----------------------------------------------------------------------------------------------
def settings_of(args: argparse.Namespace) -> Settings:
    if args.quick:
        base = Settings(
            sites=3, nights=4, scans_per_night=2, test_scans=3, slices=8, grid=128, crop=32, crops_per_slice=3,
            rounds=8, epochs=2, warm_rounds=2, warm_epochs=2, finetune_epochs=2, learning_rate=3e-3, warm_lr=3e-3,
            finetune_lr=1e-3, batch_size=16, base_channels=8, seeds=1, boot=500, shift="dose", shift_site="A",
            shift_night=2, shift_factor=0.1, speed_batch=8, speed_size=512,
        )  # fmt: skip
    else:
        base = Settings(
            sites=3, nights=6, scans_per_night=3, test_scans=4, slices=12, grid=128, crop=32, crops_per_slice=3,
            rounds=8, epochs=2, warm_rounds=2, warm_epochs=2, finetune_epochs=2, learning_rate=3e-3, warm_lr=3e-3,
            finetune_lr=1e-3, batch_size=16, base_channels=8, seeds=3, boot=2000, shift="dose", shift_site="A",
            shift_night=3, shift_factor=0.1, speed_batch=8, speed_size=512,
        )  # fmt: skip
    given = {k: v for k, v in vars(args).items() if k in Settings.__dataclass_fields__ and v is not None}
    s = replace(base, **given)
    if "shift_night" not in given:
        s = replace(s, shift_night=max(1, min(s.shift_night, s.nights)))
    if s.nights < 2:
        raise SystemExit("--nights must be >= 2 (night 0 trains every arm alike)")
    if not 1 <= s.shift_night <= s.nights:
        raise SystemExit(f"--shift-night must be in 1..{s.nights}")
    return s


def main(argv: Sequence[str] | None = None) -> None:
    extra = argparse.ArgumentParser(add_help=False)
    own = extra.add_argument_group("continual benchmark")
    for name, kind, text in (
        ("--sites", int, "demo sites (3)"),
        ("--nights", int, "training nights (quick 4, full 6); one more night of scans is the last future"),
        ("--scans-per-night", int, "new labelled scans per site and night (quick 2, full 3)"),
        ("--test-scans", int, "first-night test scans per site, never trained on (quick 3, full 4)"),
        ("--slices", int, "slices per scan (quick 8, full 12)"),
        ("--grid", int, "pixels per slice edge (128)"),
        ("--crop", int, "crop edge, pixels (32)"),
        ("--crops-per-slice", int, "crops per slice (3)"),
        ("--rounds", int, "FedAvg rounds of the scratch arm (8)"),
        ("--epochs", int, "local epochs per round of the scratch arm (2)"),
        ("--warm-rounds", int, "FedAvg rounds of the warm arm (2)"),
        ("--warm-epochs", int, "local epochs per round of the warm arm (2)"),
        ("--finetune-epochs", int, "local fine-tuning epochs of the personalised arm (2)"),
        ("--learning-rate", float, "Adam learning rate of the scratch arm (3e-3)"),
        ("--warm-lr", float, "Adam learning rate of the warm arm (3e-3)"),
        ("--finetune-lr", float, "Adam learning rate of the local fine-tuning (1e-3)"),
        ("--batch-size", int, "mini-batch (16)"),
        ("--base-channels", int, "classifier width (8)"),
        ("--seeds", int, "training seeds (quick 1, full 3)"),
        ("--boot", int, "bootstrap resamples (quick 500, full 2000)"),
        ("--shift-site", str, "the site whose protocol changes (A)"),
        ("--shift-night", int, "first night of the new protocol (quick 2, full 3)"),
        ("--shift-factor", float, "photons (dose) or field of view (fov) times this (0.1)"),
        ("--speed-batch", int, "slices per call in the throughput rows (8)"),
        ("--speed-size", int, "slice edge of the throughput rows (512)"),
        ("--threads", int, "torch threads (1)"),
    ):
        own.add_argument(name, type=kind, default=None, help=text)
    own.add_argument("--shift", choices=("dose", "fov"), default=None, help="what the protocol change is (dose)")
    own.add_argument(
        "--throughput-only", action="store_true", help="only the diagnose/surrogate throughput rows (no nights)"
    )
    args = parse_args((__doc__ or "").splitlines()[0], argv=argv, parents=[extra])
    torch.set_num_threads(args.threads or 1)
    s = settings_of(args)

    def log(msg: str) -> None:
        print(msg, flush=True)

    if args.throughput_only:
        speed = throughput_ratios(throughput(build_model("classify", base_channels=s.base_channels, seed=0), s))
        for key, value in speed.items():
            print(f"{key}: {value:.4g}")
        print(
            "target diagnose_vs_surrogate_throughput_at_least_1: "
            + ("met" if speed["diagnose_vs_surrogate_throughput"] >= 1 else "missed")
        )
        write_json(
            args.json,
            [],
            speed,
            mode="throughput-only",
            settings=asdict(s),
            speed_threads=torch.get_num_threads(),
        )
        return
    t0 = time.perf_counter()
    data = build_nights(s)
    n_train = sum(d.labels.size for night in data.new[:-1] for d in night)
    log(
        f"built {s.nights + 1} nights x {len(data.site_ids)} sites in {time.perf_counter() - t0:.1f} s: "
        f"{n_train} training crops, {sum(d.labels.size for d in data.first_test)} first-night test crops; "
        f"site {s.shift_site} {s.shift} x {s.shift_factor:g} from night {s.shift_night}"
    )
    runs = [run_seed(data, s, seed, log) for seed in range(s.seeds)]
    rows, ratios, ratio_ci = analyse(data, runs, s)
    model = site_model(runs[0].last_warm, data.so_far(s.nights - 1, 0), s)
    ratios.update(throughput_ratios(throughput(model, s)))
    table = [
        {
            "night": r["night"],
            "arm": r["arm"],
            "site": r["site"],
            "auc_future": r["auc_future"],
            "ci95": "[{:.3f}, {:.3f}]".format(*r["auc_future_ci95"]),
            "shifted": "yes" if r["future_shifted"] else "",
            "auc_first_night": r["auc_first_night"],
            "ci95 ": "[{:.3f}, {:.3f}]".format(*r["auc_first_night_ci95"]),
            "train_examples": r["train_examples"],
            "train_s": r["train_s"],
        }
        for r in rows
    ]
    print()
    print_table(table)
    print()
    for key, value in ratios.items():
        interval = ratio_ci.get(key)
        if isinstance(value, dict):
            print(
                f"{key}: "
                + ", ".join(
                    f"{k} {v:+.3f} [{ratio_ci[f'auc_personalised_minus_global_{k}'][0]:+.3f}, "
                    f"{ratio_ci[f'auc_personalised_minus_global_{k}'][1]:+.3f}]"
                    for k, v in value.items()
                )
            )
        else:
            print(f"{key}: {value:.4g}" + (f"  95% CI [{interval[0]:+.3f}, {interval[1]:+.3f}]" if interval else ""))
    targets = verdicts(ratios, ratio_ci, data.site_ids)
    for name, verdict in targets.items():
        print(f"target {name}: {verdict}")
    write_json(
        args.json,
        rows,
        ratios,
        ratio_ci95=ratio_ci,
        targets=targets,
        mode="quick" if args.quick else "full",
        settings=asdict(s),
        compute_unit="optimizer steps x batch size (examples processed), summed over sites, rounds and epochs",
        speed_threads=torch.get_num_threads(),
        site_ids=data.site_ids,
    )


if __name__ == "__main__":
    main()
