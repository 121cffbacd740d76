"""Gradient inversion: rebuild a training slice from the gradient a site would send (the server's attack).

The attack of Geiping et al. 2020 ("Inverting Gradients"): a dummy image is optimised with Adam so that the
gradient it produces has the highest cosine similarity with the observed one, plus a total-variation prior;
the label is read off the gradient of the output bias (Zhao et al. 2020, iDLG: for binary cross-entropy that
gradient is ``sigmoid(logit) − y``, negative exactly when ``y = 1``). The model's input is a slice standardised
to zero mean and unit std (as :func:`tasks.federated.training.train_local` feeds it), so the dummy is
standardised the same way before the forward pass: the attacker knows that constraint.

The observed gradient is the strongest case for the attacker: one slice, one step (FedSGD). A site's real
update (several Adam steps over many slices, then averaged) carries less.

Plain torch; quality by :func:`image_quality` (scikit-image PSNR/SSIM on standardised images).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from tasks.errors import InvalidInputError

FloatArray = npt.NDArray[np.float32]


def _standardise(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=(-2, -1), keepdim=True)
    std = x.std(dim=(-2, -1), keepdim=True, unbiased=False)
    return (x - mean) / (std + 1e-6)


def slice_gradient(
    model: nn.Module, image: npt.ArrayLike, label: int, *, device: torch.device, train_mode: bool = True
) -> list[torch.Tensor]:
    """The gradient of the binary cross-entropy of one ``(H, W)`` slice (standardised here) with 0/1 ``label``,
    one tensor per parameter of ``model`` in ``parameters()`` order. ``model`` is not changed (a copy runs,
    in training mode by default, as a site trains)."""
    x = np.asarray(image, dtype=np.float32)
    if x.ndim != 2 or not np.isfinite(x).all():
        raise InvalidInputError(f"image must be a finite (H, W) slice, got shape {x.shape}")
    if label not in (0, 1):
        raise InvalidInputError(f"label must be 0 or 1, got {label}")
    m = copy.deepcopy(model).to(device)
    m.train(train_mode)
    xt = _standardise(torch.from_numpy(x).to(device)[None, None])
    logit = m(xt).reshape(-1)
    loss = F.binary_cross_entropy_with_logits(logit, torch.full_like(logit, float(label)))
    grads = torch.autograd.grad(loss, [p for p in m.parameters() if p.requires_grad])
    return [g.detach() for g in grads]


def infer_binary_label(gradients: Sequence[torch.Tensor]) -> int:
    """The label of a single-slice gradient from the output bias (the last parameter, one element): 1 when its
    gradient ``sigmoid(logit) − y`` is negative.

    Raises
    ------
    InvalidInputError
        The last gradient is not that of a one-element output bias.
    """
    if not gradients or gradients[-1].numel() != 1:
        raise InvalidInputError("label inference needs the gradient of a one-element output bias last")
    return int(float(gradients[-1].reshape(-1)[0]) < 0)


def invert_gradient(
    model: nn.Module,
    gradients: Sequence[torch.Tensor],
    *,
    shape: tuple[int, int],
    label: int | None = None,
    iterations: int = 1000,
    learning_rate: float = 0.1,
    tv_weight: float = 1e-2,
    generator: torch.Generator,
    device: torch.device,
    train_mode: bool = True,
) -> FloatArray:
    """Rebuild the slice behind a single-slice ``gradients`` of ``model`` (as :func:`slice_gradient` gives).

    Parameters
    ----------
    model : nn.Module
        The model the site differentiated (the server holds it: it sent it). Not changed.
    gradients : sequence of tensors
        The observed gradient, one tensor per parameter.
    shape : (H, W)
        Slice size.
    label : int, optional
        0/1; inferred by :func:`infer_binary_label` when ``None``.
    iterations, learning_rate, tv_weight
        Adam steps on the dummy (learning rate decayed by a cosine schedule), and the weight of the
        total-variation prior.
    generator : torch.Generator
        Draws the initial dummy.
    device, train_mode
        Where it runs; the model's mode (that of the observed gradient).

    Returns
    -------
    array, shape (H, W)
        The rebuilt slice, standardised (zero mean, unit std).
    """
    if iterations < 1 or learning_rate <= 0 or tv_weight < 0:
        raise InvalidInputError(
            f"need iterations >= 1, learning_rate > 0, tv_weight >= 0; got {iterations}, {learning_rate}, {tv_weight}"
        )
    m = copy.deepcopy(model).to(device)
    m.train(train_mode)
    params = [p for p in m.parameters() if p.requires_grad]
    target = [g.to(device) for g in gradients]
    if len(target) != len(params) or any(g.shape != p.shape for g, p in zip(target, params, strict=False)):
        raise InvalidInputError("gradients do not match the model's parameters (count or shapes)")
    y = infer_binary_label(target) if label is None else int(label)
    target_norm = torch.sqrt(sum((g * g).sum() for g in target))  # type: ignore[arg-type]
    dummy = torch.randn((1, 1, *shape), generator=generator).to(device).requires_grad_(True)
    opt = torch.optim.Adam([dummy], lr=learning_rate)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iterations)
    yt = torch.full((1,), float(y), device=device)
    for _ in range(iterations):
        opt.zero_grad()
        x = _standardise(dummy)
        loss = F.binary_cross_entropy_with_logits(m(x).reshape(-1), yt)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        dot = sum((g * t).sum() for g, t in zip(grads, target, strict=True))
        norm = torch.sqrt(sum((g * g).sum() for g in grads))  # type: ignore[arg-type]
        cost = 1.0 - dot / (norm * target_norm + 1e-12)
        tv = (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
        (cost + tv_weight * tv).backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        out = _standardise(dummy)[0, 0].cpu().numpy()
    return np.asarray(out, dtype=np.float32)


def image_quality(reference: npt.ArrayLike, image: npt.ArrayLike) -> dict[str, float]:
    """PSNR (dB) and SSIM of ``image`` against ``reference`` (both ``(H, W)``), each standardised first (the
    attack recovers a standardised slice), data range that of the standardised reference."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    ref = np.asarray(reference, dtype=np.float64)
    img = np.asarray(image, dtype=np.float64)
    if ref.shape != img.shape or ref.ndim != 2:
        raise InvalidInputError(f"need two (H, W) images of one shape, got {ref.shape} and {img.shape}")
    ref = (ref - ref.mean()) / (ref.std() or 1.0)
    img = (img - img.mean()) / (img.std() or 1.0)
    rng = float(ref.max() - ref.min()) or 1.0
    return {
        "psnr_db": float(peak_signal_noise_ratio(ref, img, data_range=rng)),
        "ssim": float(structural_similarity(ref, img, data_range=rng)),
    }


__all__ = ["image_quality", "infer_binary_label", "invert_gradient", "slice_gradient"]
