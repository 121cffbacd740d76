"""Continual learning of the lesion models: start from the last global model, fine-tune at a site.

* :func:`warm_start_model` — a fresh model of the task carrying a saved model's entries (the promoted global
  model), so that the next federated training continues from it instead of from random weights. A state of
  another task or input size is refused by name (:func:`tasks.federated.model.set_arrays`).
* :func:`finetune_local` — local fine-tuning (personalisation) of a model on one site's slices, then, as the
  ClientApp's ``train.personalise`` message does, the BatchNorm statistics re-estimated on the same slices
  (the fine-tuned weights need their own statistics). The result stays at the site.

Plain torch, no Flower: the benchmark (``benchmarks/continual.py``) and the ClientApp can both call them.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from schemas.federation import FederatedTask
from tasks.errors import InvalidInputError
from tasks.federated.model import build_model, set_arrays
from tasks.federated.training import TrainStats, recalibrate_batchnorm, train_local

__all__ = ["finetune_local", "warm_start_model"]


def warm_start_model(
    state: Mapping[str, npt.ArrayLike | torch.Tensor],
    *,
    task: FederatedTask | str,
    base_channels: int,
    seed: int = 0,
) -> nn.Module:
    """A model of ``task`` built as :func:`~tasks.federated.model.build_model` builds it, then loaded with
    ``state`` (a whole ``state_dict`` or only the shared entries; entries it lacks keep the fresh values).

    Raises
    ------
    InvalidInputError
        ``state`` is empty, holds an entry the model lacks or one of another shape (another task, width or
        architecture), or holds NaN/inf (a diverged model is never a starting point).
    """
    if not state:
        raise InvalidInputError("warm-start state is empty: no entries to load")
    arrays: dict[str, npt.NDArray[np.generic]] = {}
    for key, value in state.items():
        arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            raise InvalidInputError(f"warm-start state entry {key!r} holds NaN or inf (a diverged model)")
        arrays[key] = arr
    model = build_model(task, base_channels=base_channels, seed=seed)
    set_arrays(model, arrays)
    return model


def finetune_local(
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
    recalibrate: bool = True,
) -> TrainStats:
    """Fine-tune ``model`` in place on one site's slices (:func:`~tasks.federated.training.train_local`, a fresh
    Adam), then re-estimate its BatchNorm statistics on the same slices when ``recalibrate``.

    Parameters
    ----------
    model : nn.Module
        The global model (already on ``device``); changed in place.
    images : array, shape (n, H, W)
        The site's surrogate slices.
    targets : array, shape (n,) or (n, H, W)
        Labels or masks, 0/1.
    task, epochs, learning_rate, batch_size, generator, device
        As for :func:`~tasks.federated.training.train_local`.
    recalibrate : bool
        Re-estimate the BatchNorm running statistics afterwards (needs at least 2 slices).

    Returns
    -------
    TrainStats
        Of the fine-tuning (its ``steps`` are optimizer steps).
    """
    stats = train_local(
        model,
        images,
        targets,
        task=task,
        epochs=epochs,
        learning_rate=learning_rate,
        batch_size=batch_size,
        generator=generator,
        device=device,
    )
    if recalibrate:
        recalibrate_batchnorm(model, images, batch_size=max(batch_size, 2), device=device)
    return stats
