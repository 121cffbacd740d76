"""Plain torch training and evaluation of the lesion models, and their metrics.

Images are surrogate slices ``(n, H, W)`` float32; each slice is standardised on its own (zero mean, unit
std) because sites differ in dose and contrast. Targets are ``(n,)`` uint8 labels (classification) or
``(n, H, W)`` uint8 masks (segmentation). Randomness (shuffling) comes only from the injected
``torch.Generator``; the device is the caller's choice.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from scipy.stats import rankdata
from torch import nn

from schemas.federation import FederatedTask
from tasks.errors import InvalidInputError
from tasks.federated.model import tracked_batchnorm

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class TrainStats:
    """What one call of :func:`train_local` did."""

    loss: float  # mean loss of the last epoch
    num_examples: int
    steps: int


def standardise_slices(images: npt.ArrayLike) -> FloatArray:
    """Each slice of ``(n, H, W)`` shifted and scaled to zero mean and unit std (constant slices → 0)."""
    x = np.asarray(images, dtype=np.float32)
    if x.ndim != 3:
        raise InvalidInputError(f"images must be (n, H, W), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise InvalidInputError("images contain NaN or inf")
    mean = x.mean(axis=(1, 2), keepdims=True)
    std = x.std(axis=(1, 2), keepdims=True)
    return np.asarray((x - mean) / np.where(std > 0, std, 1.0), dtype=np.float32)


def _check_pair(task: FederatedTask, images: FloatArray, targets: npt.NDArray[np.generic]) -> None:
    if images.ndim != 3:
        raise InvalidInputError(f"images must be (n, H, W), got shape {images.shape}")
    expected = images.shape[:1] if task is FederatedTask.CLASSIFY else images.shape
    if tuple(targets.shape) != tuple(expected):
        raise InvalidInputError(f"targets of shape {targets.shape} do not match images {images.shape} for {task}")


def _loss(task: FederatedTask, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    bce = F.binary_cross_entropy_with_logits(logits, target)
    if task is FederatedTask.CLASSIFY:
        return bce
    prob = torch.sigmoid(logits)
    inter = (prob * target).sum(dim=(1, 2))
    denom = prob.sum(dim=(1, 2)) + target.sum(dim=(1, 2))
    soft_dice = (2 * inter + 1.0) / (denom + 1.0)
    return bce + (1 - soft_dice).mean()


def _augment(
    task: FederatedTask, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One random dihedral transform (flips, transpose) per batch; masks follow their images."""
    flips = torch.randint(0, 2, (3,), generator=generator).tolist()
    dims_y = (1, 2) if task is FederatedTask.SEGMENT else None
    if flips[0]:
        x = x.flip(-1)
        y = y.flip(-1) if dims_y else y
    if flips[1]:
        x = x.flip(-2)
        y = y.flip(-2) if dims_y else y
    if flips[2] and x.shape[-1] == x.shape[-2]:
        x = x.transpose(-1, -2)
        y = y.transpose(-1, -2) if dims_y else y
    return x.contiguous(), y.contiguous()


def train_local(
    model: nn.Module,
    images: npt.ArrayLike,
    targets: npt.ArrayLike,
    *,
    task: FederatedTask | str,
    epochs: int,
    learning_rate: float,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device,
    proximal_mu: float = 0.0,
    anchor: Mapping[str, torch.Tensor] | None = None,
) -> TrainStats:
    """Train ``model`` in place with Adam on standardised slices (random flips/transposes per batch).

    Parameters
    ----------
    model : nn.Module
        Already on ``device``.
    images : array, shape (n, H, W)
        Surrogate slices (any units; standardised per slice here).
    targets : array, shape (n,) or (n, H, W)
        Labels (classification) or masks (segmentation), 0/1.
    task, epochs, learning_rate, batch_size
        What and how long to train.
    generator : torch.Generator
        Shuffles the slices each epoch (on the CPU).
    device : torch.device
        Where the batches go.
    proximal_mu : float
        FedProx μ: adds ``μ/2 · Σ‖p − anchor[p]‖²`` over the named parameters in ``anchor``.
    anchor : mapping of parameter name to tensor, optional
        The global model's parameters (required when ``proximal_mu > 0``).
    """
    task = FederatedTask(task)
    x = standardise_slices(images)
    y = np.asarray(targets)
    _check_pair(task, x, y)
    if epochs < 1 or batch_size < 1 or learning_rate <= 0:
        raise InvalidInputError(
            f"need epochs >= 1, batch_size >= 1, learning_rate > 0; got {epochs}, {batch_size}, {learning_rate}"
        )
    if proximal_mu > 0 and anchor is None:
        raise InvalidInputError("proximal_mu > 0 needs the anchor (global) parameters")
    n = x.shape[0]
    if n == 0:
        raise InvalidInputError("no training slices")
    xt = torch.from_numpy(x).unsqueeze(1)
    yt = torch.from_numpy(y.astype(np.float32))
    params = dict(model.named_parameters())
    anchors = {k: v.detach().to(device) for k, v in (anchor or {}).items() if k in params}
    opt = torch.optim.Adam(model.parameters(), lr=learning_rate)
    model.train()
    steps = 0
    last = 0.0
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        total, count = 0.0, 0
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            if idx.numel() < 2 and n >= 2:
                continue  # BatchNorm needs two samples; the slice comes back next epoch
            xb, yb = _augment(task, xt[idx], yt[idx], generator)
            xb, yb = xb.to(device), yb.to(device)
            opt.zero_grad()
            loss = _loss(task, model(xb), yb)
            if proximal_mu > 0:
                prox = sum(((params[k] - a) ** 2).sum() for k, a in anchors.items())
                loss = loss + 0.5 * proximal_mu * prox
            loss.backward()
            opt.step()
            total += float(loss.detach()) * idx.numel()
            count += idx.numel()
            steps += 1
        last = total / max(count, 1)
    return TrainStats(loss=last, num_examples=n, steps=steps)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images: npt.ArrayLike, *, batch_size: int, device: torch.device) -> int:
    """Re-estimate every BatchNorm layer's running mean and variance on ``images``; the weights are unchanged.

    Under local BatchNorm statistics (``FederationConfig.local_bn_statistics``) a site calls this with its own
    training slices after loading global weights: during local training each site normalises with its own
    batch statistics, so the averaged (or stale) running statistics would not match what the weights were
    trained with. The statistics are the average over batches of the batch statistics (``momentum=None``),
    each layer seeing the output of the already re-estimated layers before it (one pass in training mode,
    no gradients); the model's mode and the layers' momentum are restored.

    Parameters
    ----------
    model : nn.Module
        Already on ``device``; changed in place (running statistics only).
    images : array, shape (n, H, W)
        Slices of the site (standardised per slice here, as in :func:`train_local`); not modified.
    batch_size, device
        Batches of the pass and where they go.

    Returns
    -------
    int
        BatchNorm layers re-estimated (0: the model has none and is left as it was).
    """
    x = standardise_slices(images)
    if x.shape[0] < 2:
        raise InvalidInputError(f"re-estimating BatchNorm statistics needs at least 2 slices, got {x.shape[0]}")
    if batch_size < 2:
        raise InvalidInputError(f"batch_size must be >= 2 (batch statistics), got {batch_size}")
    layers = [m for _, m in tracked_batchnorm(model)]
    if not layers:
        return 0
    momenta = [m.momentum for m in layers]
    was_training = model.training
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average of the batch statistics
    model.train()
    n = x.shape[0]
    starts = [s for s in range(0, n, batch_size) if min(batch_size, n - s) >= 2 or s == 0]
    for start in starts:
        model(torch.from_numpy(x[start : start + batch_size]).unsqueeze(1).to(device))
    for m, momentum in zip(layers, momenta, strict=True):
        m.momentum = momentum
    model.train(was_training)
    return len(layers)


@torch.no_grad()
def predict(model: nn.Module, images: npt.ArrayLike, *, batch_size: int, device: torch.device) -> FloatArray:
    """Probabilities: ``(n,)`` per slice (classifier) or ``(n, H, W)`` per pixel (U-Net)."""
    x = standardise_slices(images)
    model.eval()
    outs = []
    for start in range(0, x.shape[0], batch_size):
        xb = torch.from_numpy(x[start : start + batch_size]).unsqueeze(1).to(device)
        outs.append(torch.sigmoid(model(xb)).cpu().numpy())
    if not outs:
        return np.zeros((0,), dtype=np.float32)
    return np.concatenate(outs).astype(np.float32)


def auc_score(scores: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Area under the ROC curve by the Mann–Whitney U statistic (ties count one half).

    ``AUC = (R₁ − n₁(n₁+1)/2) / (n₁ n₀)`` with R₁ the rank sum of the positives (average ranks for ties).
    NaN when one class is absent.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    if s.shape != y.shape:
        raise InvalidInputError(f"scores {s.shape} and labels {y.shape} differ in length")
    n1 = int(y.sum())
    n0 = y.size - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def bootstrap_indices(labels: npt.ArrayLike, *, n_boot: int, seed: int) -> npt.NDArray[np.intp]:
    """``(n_boot, n)`` indices of a class-stratified bootstrap of ``labels``: each resample draws the positives
    from the positives and the negatives from the negatives (with replacement), so every resample keeps both
    classes and their counts; positives come first in every row. The same indices are meant to be applied to
    every method's scores, which makes differences between methods *paired*."""
    y = np.asarray(labels).ravel().astype(bool)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    if pos.size == 0 or neg.size == 0:
        raise InvalidInputError("a bootstrap of AUC needs both classes")
    rng = np.random.default_rng(seed)
    return np.concatenate(
        [pos[rng.integers(0, pos.size, (n_boot, pos.size))], neg[rng.integers(0, neg.size, (n_boot, neg.size))]],
        axis=1,
    )


def bootstrap_seed_draws(n_seeds: int, *, n_boot: int, seed: int) -> npt.NDArray[np.intp]:
    """``(n_boot, n_seeds)`` indices of training seeds drawn with replacement, one row per bootstrap resample.

    Used with :func:`bootstrap_aucs` (``seed_draws``), each resample averages the AUCs of a resampled set of
    seeds, so an interval covers the training randomness as well as the test sample. The same draws are meant
    for every method whose seed ``k`` shares its initialisation and shuffling seed, which keeps differences
    paired over seeds too.
    """
    if n_seeds < 1 or n_boot < 1:
        raise InvalidInputError(f"need n_seeds >= 1 and n_boot >= 1, got {n_seeds} and {n_boot}")
    return np.random.default_rng(seed).integers(0, n_seeds, (n_boot, n_seeds))


def bootstrap_aucs(
    score_sets: list[npt.ArrayLike],
    labels: npt.ArrayLike,
    indices: npt.NDArray[np.intp],
    *,
    seed_draws: npt.NDArray[np.intp] | None = None,
) -> npt.NDArray[np.float64]:
    """AUC on each bootstrap resample (rows of ``indices`` from :func:`bootstrap_indices`), averaged over the
    score sets (one per seed): ``(n_boot,)``. Ties count one half, as in :func:`auc_score`.

    ``seed_draws`` (``(n_boot, k)`` from :func:`bootstrap_seed_draws`): resample ``b`` averages the score sets
    ``seed_draws[b]`` (with repeats) instead of all of them: a two-level bootstrap over seeds and test crops.
    """
    y = np.asarray(labels).ravel().astype(bool)
    n1 = int(y[indices[0]].sum())
    n0 = indices.shape[1] - n1
    per_set = np.zeros((len(score_sets), indices.shape[0]))
    for k, scores in enumerate(score_sets):
        s = np.asarray(scores, dtype=np.float64).ravel()[indices]
        ranks = rankdata(s, axis=1)
        per_set[k] = (ranks[:, :n1].sum(axis=1) - n1 * (n1 + 1) / 2.0) / (n1 * n0)
    if seed_draws is None:
        return np.asarray(per_set.mean(axis=0), dtype=np.float64)
    draws = np.asarray(seed_draws)
    if draws.ndim != 2 or draws.shape[0] != indices.shape[0] or draws.size == 0:
        raise InvalidInputError(f"seed_draws must be (n_boot={indices.shape[0]}, k), got shape {draws.shape}")
    if draws.min() < 0 or draws.max() >= len(score_sets):
        raise InvalidInputError(
            f"seed_draws index score sets 0..{len(score_sets) - 1}, got {draws.min()}..{draws.max()}"
        )
    return np.asarray(per_set[draws, np.arange(indices.shape[0])[:, None]].mean(axis=1), dtype=np.float64)


def percentile_ci(samples: npt.ArrayLike, level: float = 0.95) -> tuple[float, float]:
    """Two-sided percentile interval of bootstrap ``samples``."""
    a = np.asarray(samples, dtype=np.float64)
    lo, hi = np.quantile(a, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def dice_score(pred: npt.ArrayLike, truth: npt.ArrayLike) -> float:
    """Dice overlap ``2|P∩T| / (|P|+|T|)`` of two binary masks (1.0 when both are empty)."""
    p = np.asarray(pred).astype(bool)
    t = np.asarray(truth).astype(bool)
    if p.shape != t.shape:
        raise InvalidInputError(f"masks differ in shape: {p.shape} vs {t.shape}")
    denom = int(p.sum()) + int(t.sum())
    return 1.0 if denom == 0 else float(2 * np.logical_and(p, t).sum() / denom)


def evaluate(
    model: nn.Module,
    images: npt.ArrayLike,
    targets: npt.ArrayLike,
    *,
    task: FederatedTask | str,
    batch_size: int,
    device: torch.device,
) -> dict[str, float]:
    """Loss and metrics on held-out slices: ``loss``, ``accuracy`` (threshold 0.5), ``auc`` (slice-level;
    for segmentation the slice score is the maximum pixel probability), ``dice`` (segmentation only)."""
    task = FederatedTask(task)
    x = np.asarray(images, dtype=np.float32)
    y = np.asarray(targets)
    _check_pair(task, x, y)
    prob = predict(model, x, batch_size=batch_size, device=device)
    eps = 1e-6
    p = np.clip(prob.astype(np.float64), eps, 1 - eps)
    yf = y.astype(np.float64)
    loss = float(-(yf * np.log(p) + (1 - yf) * np.log(1 - p)).mean()) if y.size else float("nan")
    out: dict[str, float] = {"loss": loss}
    if task is FederatedTask.CLASSIFY:
        out["accuracy"] = float(((prob >= 0.5) == y.astype(bool)).mean()) if y.size else float("nan")
        out["auc"] = auc_score(prob, y)
    else:
        slice_labels = y.reshape(y.shape[0], -1).any(axis=1)
        out["accuracy"] = float(((prob >= 0.5) == y.astype(bool)).mean()) if y.size else float("nan")
        out["auc"] = auc_score(prob.reshape(prob.shape[0], -1).max(axis=1), slice_labels)
        out["dice"] = dice_score(prob >= 0.5, y)
    return out
