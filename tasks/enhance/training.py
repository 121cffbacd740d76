"""Local training of the enhance network on a site's own pairs: plain torch, CPU or CUDA, deterministic under an
injected ``torch.Generator``; no Prefect, Dask, Zarr or Flower (the federated apps call :func:`train_enhance`).

Two targets, both built from the site's projections (:mod:`tasks.enhance.pairs`):

* ``noise2inverse`` (self-supervised, any projection scan): inputs the mean of ``K - 1`` view-split FBPs,
  targets the remaining split;
* ``thinning`` (supervised, scans with counts): input the FBP of the kept photons (dose ``f``), target the FBP
  of the remaining photons (dose ``1 - f``), the two independent by construction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from schemas.geometry import Geometry
from tasks.enhance.pairs import counts_to_line_integrals, noise2inverse_pairs, reconstruct_splits, thin_counts
from tasks.errors import InvalidInputError, TrainingDivergedError
from tasks.reconstruct.kernels import FilterName, attenuation_to_hu, fbp

__all__ = ["Target", "TrainResult", "TrainSettings", "build_pairs", "train_enhance"]

Target = Literal["noise2inverse", "thinning"]
FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class TrainSettings:
    """Local training options (one site, one round)."""

    steps: int = 200
    batch_size: int = 8
    learning_rate: float = 1e-3
    augment: bool = True  # random flips and quarter turns of each batch (the anatomy has no preferred side)
    proximal_mu: float = 0.0  # FedProx: + mu/2 ||w - w_start||^2 (0 = plain local training / FedAvg)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise InvalidInputError(f"steps ({self.steps}) and batch_size ({self.batch_size}) must be >= 1")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)) or self.proximal_mu < 0:
            raise InvalidInputError(
                f"learning_rate ({self.learning_rate}) must be finite and > 0, proximal_mu ({self.proximal_mu}) >= 0"
            )


@dataclass(frozen=True)
class TrainResult:
    """The trained weights (on the CPU) and what training measured."""

    state_dict: dict[str, torch.Tensor]
    metrics: dict[str, float | int] = field(default_factory=dict)


def build_pairs(
    projections: npt.NDArray[np.floating[Any]],
    geometry: Geometry,
    *,
    target: Target,
    water_attenuation_per_mm: float,
    device: torch.device,
    counts: npt.NDArray[np.floating[Any]] | None = None,
    i0_photons: float | None = None,
    rng: np.random.Generator | None = None,
    k: int = 2,
    fraction: float = 0.5,
    filter_name: FilterName = "hann",
) -> tuple[FloatArray, FloatArray]:
    """(input, target) HU slice pairs of one scan for the chosen training target.

    Parameters
    ----------
    projections : numpy.ndarray
        ``(views, rows, cols)`` line integrals (``noise2inverse``); not modified.
    geometry : Geometry
        The scan's geometry.
    target : {"noise2inverse", "thinning"}
    water_attenuation_per_mm : float
        For the conversion to HU (what the stage's volumes hold).
    device : torch.device
        Where the FBPs run.
    counts, i0_photons, rng
        ``thinning`` only: ``(views, rows, cols)`` detected photons, the unattenuated count, the generator.
    k : int
        ``noise2inverse``: view subsets.
    fraction : float
        ``thinning``: dose fraction of the input.
    filter_name : str
        FBP filter of every reconstruction.

    Returns
    -------
    tuple of numpy.ndarray
        ``(n, ny, nx)`` inputs and targets, float32 HU (``n = k * rows`` or ``rows``).

    Raises
    ------
    InvalidInputError
        An unknown target; ``thinning`` without counts, I0 or a generator (names what is missing); a view count
        that cannot be split.
    """
    if target == "noise2inverse":
        splits = reconstruct_splits(
            projections,
            geometry,
            k=k,
            filter_name=filter_name,
            water_attenuation_per_mm=water_attenuation_per_mm,
            device=device,
        )
        return noise2inverse_pairs(splits)
    if target == "thinning":
        missing = [n for n, v in (("counts", counts), ("i0_photons", i0_photons), ("rng", rng)) if v is None]
        if missing:
            raise InvalidInputError(f"the thinning target needs {', '.join(missing)} (a scan with raw counts)")
        assert counts is not None
        assert i0_photons is not None
        assert rng is not None
        kept, rest = thin_counts(counts, fraction=fraction, rng=rng)
        g = geometry.model_copy(update={"n_detector_rows": counts.shape[1]})
        images = []
        for photons, dose in ((kept, fraction), (rest, 1.0 - fraction)):
            lines = counts_to_line_integrals(photons, i0_photons=dose * i0_photons)
            sino = np.ascontiguousarray(lines.transpose(1, 0, 2))
            img = np.asarray(fbp(sino, g, filter_name=filter_name, device=device))
            images.append(
                np.asarray(attenuation_to_hu(img, water_attenuation_per_mm=water_attenuation_per_mm), np.float32)
            )
        return images[0], images[1]
    raise InvalidInputError(f"training target must be 'noise2inverse' or 'thinning', got {target!r}")


def _augment(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    turns = int(torch.randint(4, (1,), generator=generator))
    flip = bool(torch.randint(2, (1,), generator=generator))
    if x.shape[-1] != x.shape[-2]:
        turns = 2 * (turns % 2)  # half turns only on a non-square grid
    x, y = torch.rot90(x, turns, dims=(-2, -1)), torch.rot90(y, turns, dims=(-2, -1))
    if flip:
        x, y = torch.flip(x, dims=(-1,)), torch.flip(y, dims=(-1,))
    return x, y


def train_enhance(
    model: nn.Module,
    inputs: npt.NDArray[np.floating[Any]],
    targets: npt.NDArray[np.floating[Any]],
    *,
    settings: TrainSettings,
    generator: torch.Generator,
    device: torch.device,
) -> TrainResult:
    """Train ``model`` in place on ``(n, ny, nx)`` HU pairs with Adam and the MSE on ``x / intensity_scale``.

    Batches are drawn (with their augmentations) from ``generator`` alone, so the same generator state, data
    and starting weights give the same weights on the same machine.

    Parameters
    ----------
    model : torch.nn.Module
        A :class:`~tasks.enhance.model.ResidualUNet` (its ``arch.intensity_scale_hu`` scales the loss).
    inputs, targets : numpy.ndarray
        Same shape ``(n, ny, nx)``, finite, HU; not modified.
    settings : TrainSettings
    generator : torch.Generator
        CPU generator: batch order and augmentations.
    device : torch.device

    Returns
    -------
    TrainResult
        Weights on the CPU; metrics ``loss_first``, ``loss_last`` (mean of the last tenth of the steps),
        ``steps``, ``examples``.

    Raises
    ------
    InvalidInputError
        Mismatched shapes, no pairs, NaN/inf in the pairs.
    TrainingDivergedError
        The loss became NaN or inf (names the step); the model is left as it was at that step and must not be
        used.
    """
    if inputs.shape != targets.shape or inputs.ndim != 3 or inputs.shape[0] < 1:
        raise InvalidInputError(f"inputs {inputs.shape} and targets {targets.shape} must be the same (n>=1, ny, nx)")
    if not (np.isfinite(inputs).all() and np.isfinite(targets).all()):
        raise InvalidInputError("training pairs hold NaN or inf")
    scale = float(getattr(getattr(model, "arch", None), "intensity_scale_hu", 1.0))
    x_all = torch.as_tensor(np.asarray(inputs, dtype=np.float32), device=device)
    y_all = torch.as_tensor(np.asarray(targets, dtype=np.float32), device=device)
    model.to(device).train()
    start = [p.detach().clone() for p in model.parameters()] if settings.proximal_mu > 0 else []
    optimiser = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    n = x_all.shape[0]
    losses: list[float] = []
    order = torch.randperm(n, generator=generator)
    pos = 0
    for step in range(settings.steps):
        if pos + min(settings.batch_size, n) > n:
            order, pos = torch.randperm(n, generator=generator), 0
        idx = order[pos : pos + settings.batch_size].to(device)
        pos += settings.batch_size
        x, y = x_all[idx], y_all[idx]
        if settings.augment:
            x, y = _augment(x, y, generator)
        optimiser.zero_grad(set_to_none=True)
        loss = torch.mean(((model(x) - y) / scale) ** 2)
        if start:
            prox = sum(torch.sum((p - p0) ** 2) for p, p0 in zip(model.parameters(), start, strict=True))
            loss = loss + 0.5 * settings.proximal_mu * prox
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingDivergedError(f"training loss is {value} at step {step} of {settings.steps}")
        losses.append(value)
        loss.backward()
        optimiser.step()
    tail = losses[-max(1, len(losses) // 10) :]
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if not all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()):
        raise TrainingDivergedError(f"training left non-finite weights after {settings.steps} steps")
    return TrainResult(
        state_dict=state,
        metrics={
            "loss_first": losses[0],
            "loss_last": float(np.mean(tail)),
            "steps": settings.steps,
            "examples": int(n),
        },
    )
