"""One site's local training of the enhance network from its own store: the function a federated client calls.

:func:`fit_enhance` reads the site's projection scans, builds the training pairs inside the site
(:func:`site_pairs`; nothing is written anywhere), starts from the global weights it is given and returns the
new weights with metrics (examples, losses) — what a Flower ``ClientApp`` sends back. A site with no projection
data is refused by name (the caller skips it and names it in its report); a NaN loss raises
:class:`~tasks.errors.TrainingDivergedError` (the caller rejects that site's update).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from schemas.stages import PROJECTION_KINDS
from tasks.enhance.model import Architecture, build_model
from tasks.enhance.training import Target, TrainSettings, build_pairs, train_enhance
from tasks.errors import InvalidInputError, TrainingDivergedError
from tasks.storage import SiteStore

__all__ = ["FedAvgResult", "FitConfig", "average_states", "fedavg_in_process", "fit_enhance", "site_pairs"]

Pairs = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class FitConfig:
    """What one local fit does (a federated round passes it to every site, with the round in ``seed``)."""

    arch: Architecture = field(default_factory=Architecture)
    target: Target = "noise2inverse"
    settings: TrainSettings = field(default_factory=TrainSettings)
    seed: int = 0
    scan_ids: Sequence[str] | None = None  # None: every projection scan of the site
    k: int = 2
    fraction: float = 0.5
    device: str = "cpu"


def site_pairs(site: SiteStore, config: FitConfig) -> Pairs:
    """The site's training pairs (HU), every selected projection scan's concatenated; built in memory only.

    Raises
    ------
    InvalidInputError
        The site has no projection scan (or, for ``thinning``, none with counts) among those selected.
    """
    inputs, targets = [], []
    rng = np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(0,)))
    for scan in site.scans():
        manifest = scan.manifest
        if config.scan_ids is not None and scan.scan_id not in config.scan_ids:
            continue
        if manifest.data_kind not in PROJECTION_KINDS or manifest.geometry is None:
            continue
        names = scan.array_names()
        if config.target == "thinning" and ("counts" not in names or manifest.i0_photons is None):
            continue
        x, y = build_pairs(
            np.asarray(scan.array("projections")[...]),
            manifest.geometry,
            target=config.target,
            water_attenuation_per_mm=manifest.water_attenuation_per_mm,
            device=torch.device(config.device),
            counts=np.asarray(scan.array("counts")[...]) if config.target == "thinning" else None,
            i0_photons=manifest.i0_photons,
            rng=rng,
            k=config.k,
            fraction=config.fraction,
        )
        inputs.append(x)
        targets.append(y)
    if not inputs:
        what = "projection scans with counts" if config.target == "thinning" else "projection scans"
        raise InvalidInputError(f"site {site.site_id!r} has no {what} to train the enhance network on")
    return np.concatenate(inputs), np.concatenate(targets)


def fit_enhance(
    site: SiteStore,
    global_state: Mapping[str, torch.Tensor] | None,
    config: FitConfig,
    *,
    pairs: Pairs | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float | int]]:
    """Train the network from ``global_state`` (None: a fresh network from ``config.seed``) on the site's pairs.

    ``pairs``: the site's :func:`site_pairs` computed earlier (a federated run builds them once, not per round).
    Returns the new weights (CPU) and metrics (``examples`` weights FedAvg; losses).
    """
    if pairs is None:
        pairs = site_pairs(site, config)
    generator = torch.Generator().manual_seed(config.seed)
    model = build_model(config.arch, generator=generator)
    if global_state is not None:
        model.load_state_dict(dict(global_state))
    result = train_enhance(
        model, pairs[0], pairs[1], settings=config.settings, generator=generator, device=torch.device(config.device)
    )
    return result.state_dict, result.metrics


def average_states(updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """FedAvg's aggregate: the ``weights``-weighted mean of each tensor (in float64, cast back to its dtype)."""
    if not updates or len(updates) != len(weights) or not sum(weights) > 0:
        raise InvalidInputError(f"{len(updates)} updates with weights {list(weights)}: nothing to average")
    total = float(sum(weights))
    out: dict[str, torch.Tensor] = {}
    for key, ref in updates[0].items():
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for update, w in zip(updates, weights, strict=True):
            acc += update[key].to(torch.float64) * (w / total)
        out[key] = acc.to(ref.dtype)
    return out


@dataclass(frozen=True)
class FedAvgResult:
    """What :func:`fedavg_in_process` produced: the global weights, the rejected updates (named), per-round
    metrics."""

    state: dict[str, torch.Tensor]
    rejected: list[str]
    rounds: list[dict[str, float | int]]


def fedavg_in_process(
    sites: Sequence[SiteStore],
    config: FitConfig,
    *,
    rounds: int,
    pairs: Sequence[Pairs] | None = None,
) -> FedAvgResult:
    """FedAvg by direct calls of :func:`fit_enhance` in this process: **not Flower** (no messages, no SecAgg, no
    DP) — the aggregation arithmetic and the failure policy a Flower ServerApp must reproduce, for the benchmark
    and tests. Round ``r`` trains every site from the global weights with seed ``config.seed * 1000 + r`` and
    averages the updates weighted by examples. A site whose loss diverges is rejected for that round and named;
    a round in which every site diverged raises (no diverged model is ever returned).

    Raises
    ------
    TrainingDivergedError
        Every site diverged in some round.
    InvalidInputError
        ``rounds < 1``; a site without projection scans (from :func:`site_pairs`).
    """
    if rounds < 1:
        raise InvalidInputError(f"rounds must be >= 1, got {rounds}")
    site_pairs_ = list(pairs) if pairs is not None else [site_pairs(site, config) for site in sites]
    state = build_model(config.arch, generator=torch.Generator().manual_seed(config.seed)).state_dict()
    state = {k: v.detach().clone() for k, v in state.items()}
    rejected: list[str] = []
    history: list[dict[str, float | int]] = []
    for r in range(rounds):
        updates, weights, losses = [], [], []
        for site, p in zip(sites, site_pairs_, strict=True):
            try:
                new, metrics = fit_enhance(site, state, replace(config, seed=config.seed * 1000 + r), pairs=p)
            except TrainingDivergedError as exc:
                rejected.append(f"round {r}: site {site.site_id!r}: {exc}")
                continue
            updates.append(new)
            weights.append(float(metrics["examples"]))
            losses.append(float(metrics["loss_last"]))
        if not updates:
            raise TrainingDivergedError(f"FedAvg round {r}: every site diverged ({'; '.join(rejected)}); no model")
        state = average_states(updates, weights)
        history.append({"round": r, "sites": len(updates), "loss_last_mean": float(np.mean(losses))})
    return FedAvgResult(state=state, rejected=rejected, rounds=history)
