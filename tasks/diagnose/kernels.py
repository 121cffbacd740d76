"""Pure scoring of surrogate slices by a trained lesion model (torch; no Prefect, Dask, Zarr or Flower).

Scoring is :func:`tasks.federated.training.predict`'s arithmetic made cheaper for inference, with the same results
to float tolerance: :func:`inference_model` folds every BatchNorm into the convolution before it and computes the
2×2 max pools as elementwise maxima (exact), in channels-last memory; :func:`score_slices` runs under
``torch.inference_mode`` in sub-batches of at most :data:`PIXELS_PER_PASS` pixels (large batches of large slices
leave the CPU caches: one 512² slice per pass scores about twice as fast as eight).
"""

from __future__ import annotations

import copy
import itertools

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from schemas.federation import FederatedTask
from tasks.errors import InvalidInputError
from tasks.federated.training import standardise_slices

__all__ = ["PIXELS_PER_PASS", "check_model_fits", "inference_model", "score_slices", "slice_scores"]

PIXELS_PER_PASS = 2**18
"""Most pixels per forward pass of :func:`score_slices` (one 512² slice; 16 slices of 128²)."""


class PairMaxPool(nn.Module):
    """``nn.MaxPool2d(2)`` (odd edges dropped) as elementwise maxima of the four pixels of each 2×2 cell: the same
    values, several times faster than ATen's pooling on channels-last tensors."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
        y = x[..., :h, :w]
        rows = torch.maximum(y[..., 0::2, :], y[..., 1::2, :])
        return torch.maximum(rows[..., 0::2], rows[..., 1::2])


def _is_pair_pool(m: nn.Module) -> bool:
    def pair(v: object) -> bool:
        return v == 2 or v == (2, 2)

    return (
        isinstance(m, nn.MaxPool2d)
        and pair(m.kernel_size)
        and pair(m.stride if m.stride is not None else m.kernel_size)
        and m.padding in (0, (0, 0))
        and m.dilation in (1, (1, 1))
        and not m.ceil_mode
        and not m.return_indices
    )


def inference_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` for scoring only (``model`` is untouched): eval mode, each ``Conv2d`` directly followed
    by a ``BatchNorm2d`` (within an ``nn.Sequential``) folded into one convolution, 2×2 max pools as
    :class:`PairMaxPool`, parameters in channels-last memory. Its outputs equal ``model.eval()``'s to float
    rounding; training it is meaningless (the BatchNorm layers are gone).

    Examples
    --------
    >>> from tasks.federated.model import build_model
    >>> m = inference_model(build_model("classify", base_channels=4, seed=0))
    >>> sum(isinstance(x, nn.BatchNorm2d) for x in m.modules())
    0
    """
    fast = copy.deepcopy(model).eval()
    for parent in list(fast.modules()):
        children = list(parent.named_children())
        if isinstance(parent, nn.Sequential):
            for (name, conv), (bn_name, bn) in itertools.pairwise(children):
                if (
                    isinstance(conv, nn.Conv2d)
                    and isinstance(bn, nn.BatchNorm2d)
                    and bn.track_running_stats
                    and bn.running_mean is not None
                ):
                    setattr(parent, name, fuse_conv_bn_eval(conv, bn))
                    setattr(parent, bn_name, nn.Identity())
        for name, child in children:
            if _is_pair_pool(child):
                setattr(parent, name, PairMaxPool())
    for p in fast.parameters():
        p.requires_grad_(False)
    return fast.to(memory_format=torch.channels_last)  # type: ignore[call-overload]


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
        Most slices per forward pass (memory only); passes also hold at most :data:`PIXELS_PER_PASS` pixels
        (at least one slice). Every slice's score is the same whatever the batching.

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
    xt = torch.from_numpy(standardise_slices(x))
    step = max(1, min(batch_size, PIXELS_PER_PASS // max(1, x.shape[1] * x.shape[2])))
    model.eval()
    out: npt.NDArray[np.float32] | None = None
    with torch.inference_mode():
        for start in range(0, x.shape[0], step):
            xb = xt[start : start + step].unsqueeze(1).to(device).contiguous(memory_format=torch.channels_last)
            p = torch.sigmoid(model(xb)).to("cpu", torch.float32).numpy()
            if out is None:
                out = np.empty((x.shape[0], *p.shape[1:]), dtype=np.float32)
            out[start : start + p.shape[0]] = p
    assert out is not None
    return out


def slice_scores(probabilities: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """One score per slice: the probability itself ``(n,)``, or the largest pixel probability of ``(n, H, W)``."""
    p = np.asarray(probabilities, dtype=np.float32)
    if p.ndim == 1:
        return p
    return np.asarray(p.reshape(p.shape[0], -1).max(axis=1), dtype=np.float32)
