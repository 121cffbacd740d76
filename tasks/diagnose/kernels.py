"""Pure scoring of surrogate slices by a trained lesion model (torch; no Prefect, Dask, Zarr or Flower)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from schemas.federation import FederatedTask
from tasks.errors import InvalidInputError
from tasks.federated.training import predict

__all__ = ["check_model_fits", "score_slices", "slice_scores"]


def check_model_fits(
    *,
    version: str,
    model_task: FederatedTask | str,
    model_size: tuple[int, int],
    slice_shape: tuple[int, ...],
    expected_task: FederatedTask | str | None = None,
) -> None:
    """Refuse a model trained for another task or another slice size, naming the model and both values.

    Raises
    ------
    InvalidInputError
        ``expected_task`` is given and differs from ``model_task``, or ``slice_shape[-2:]`` is not ``model_size``.
    """
    if expected_task is not None and FederatedTask(expected_task) is not FederatedTask(model_task):
        raise InvalidInputError(
            f"model {version} was trained for task {FederatedTask(model_task).value!r}; this site diagnoses "
            f"{FederatedTask(expected_task).value!r}"
        )
    size = tuple(int(s) for s in slice_shape[-2:])
    if size != tuple(model_size):
        raise InvalidInputError(
            f"model {version} was trained on {model_size[0]}x{model_size[1]} surrogates; these slices are "
            f"{size[0]}x{size[1]}"
        )


def score_slices(
    model: nn.Module, slices: npt.ArrayLike, *, batch_size: int, device: torch.device
) -> npt.NDArray[np.float32]:
    """Lesion probabilities of surrogate slices.

    Parameters
    ----------
    model : nn.Module
        A :mod:`tasks.federated.model` network on ``device``; put in eval mode (BatchNorm uses its stored
        statistics, so every slice's score is independent of the others in its batch).
    slices : array, shape (n, H, W)
        Surrogate slices (standardised per slice, as in training); not modified.
    batch_size : int
        Slices per forward pass (memory only).

    Returns
    -------
    ndarray, float32
        ``(n,)`` per-slice probabilities (classifier) or ``(n, H, W)`` per-pixel probabilities (U-Net).

    Examples
    --------
    >>> from tasks.federated.model import build_model
    >>> m = build_model("classify", base_channels=4, seed=0)
    >>> score_slices(m, np.zeros((3, 16, 16), np.float32), batch_size=2, device=torch.device("cpu")).shape
    (3,)
    """
    x = np.asarray(slices, dtype=np.float32)
    if x.ndim != 3:
        raise InvalidInputError(f"slices must be (n, H, W), got shape {x.shape}")
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
    if x.shape[0] == 0:
        return np.zeros((0,), dtype=np.float32)
    return predict(model, x, batch_size=batch_size, device=device)


def slice_scores(probabilities: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """One score per slice: the probability itself ``(n,)``, or the largest pixel probability of ``(n, H, W)``."""
    p = np.asarray(probabilities, dtype=np.float32)
    if p.ndim == 1:
        return p
    return np.asarray(p.reshape(p.shape[0], -1).max(axis=1), dtype=np.float32)
