"""Membership inference against a slice classifier: was this slice in the training set?

Two attacks, both scored by the AUC of telling training slices (members) from slices of the same distribution
the model never saw (non-members); 0.5 is chance.

* **Loss threshold** (Yeom et al. 2018): a member tends to have a lower loss; the score is ``−loss``.
* **Shadow models** (Shokri et al. 2017): the attacker trains models of the same architecture and procedure on
  public data of the same distribution, labels each shadow model's outputs on its own training slices "in" and
  on held-out ones "out", and fits an attack classifier (here a logistic regression on per-slice features:
  loss, label, loss × label, so that each class gets its own threshold) that it then applies to the target.

Plain torch and numpy; the caller trains the target and shadow models.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from tasks.errors import InvalidInputError
from tasks.federated.training import auc_score, standardise_slices

FloatArray = npt.NDArray[np.float32]


@torch.no_grad()
def slice_losses(
    model: nn.Module, images: npt.ArrayLike, labels: npt.ArrayLike, *, batch_size: int, device: torch.device
) -> FloatArray:
    """Per-slice binary cross-entropy of ``model`` (eval mode) on ``images`` ``(n, H, W)`` with 0/1 ``labels``.

    Images are standardised per slice, as in training. The model's mode is restored.
    """
    x = standardise_slices(images)
    y = np.asarray(labels, dtype=np.float32)
    if y.shape != x.shape[:1]:
        raise InvalidInputError(f"labels of shape {y.shape} do not match images {x.shape}")
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, x.shape[0], batch_size):
        xb = torch.from_numpy(x[start : start + batch_size]).unsqueeze(1).to(device)
        yb = torch.from_numpy(y[start : start + batch_size]).to(device)
        logits = model(xb).reshape(-1)
        out.append(F.binary_cross_entropy_with_logits(logits, yb, reduction="none").cpu().numpy())
    model.train(was_training)
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0,), dtype=np.float32)


def loss_attack_auc(member_losses: npt.ArrayLike, nonmember_losses: npt.ArrayLike) -> float:
    """AUC of the loss-threshold attack: members scored by ``−loss`` against non-members.

    Raises
    ------
    InvalidInputError
        Either set is empty or holds a non-finite loss (a diverged model has no membership figure).
    """
    a = np.asarray(member_losses, dtype=np.float64).ravel()
    b = np.asarray(nonmember_losses, dtype=np.float64).ravel()
    if a.size == 0 or b.size == 0:
        raise InvalidInputError(f"need members and non-members, got {a.size} and {b.size}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise InvalidInputError("losses contain NaN or inf (diverged model)")
    return auc_score(-np.concatenate([a, b]), np.r_[np.ones(a.size), np.zeros(b.size)])


def attack_features(losses: npt.ArrayLike, labels: npt.ArrayLike) -> FloatArray:
    """Per-slice features of the shadow attack: ``[loss, label, loss·label]`` ``(n, 3)``."""
    lo = np.asarray(losses, dtype=np.float32).ravel()
    y = np.asarray(labels, dtype=np.float32).ravel()
    if lo.shape != y.shape:
        raise InvalidInputError(f"losses {lo.shape} and labels {y.shape} differ in length")
    return np.stack([lo, y, lo * y], axis=1).astype(np.float32)


@dataclass(frozen=True)
class ShadowAttack:
    """A logistic-regression attack model fitted on shadow models' in/out features."""

    mean: FloatArray
    scale: FloatArray
    weights: FloatArray
    bias: float

    @classmethod
    def fit(cls, features_in: npt.ArrayLike, features_out: npt.ArrayLike, *, l2: float = 1e-3) -> ShadowAttack:
        """Fit on shadow members ``features_in`` and shadow non-members ``features_out`` (each ``(n, k)``),
        class-balanced, L2-penalised (``l2``), by L-BFGS on the standardised features."""
        fi = np.asarray(features_in, dtype=np.float64)
        fo = np.asarray(features_out, dtype=np.float64)
        if fi.ndim != 2 or fo.ndim != 2 or fi.shape[1] != fo.shape[1] or not len(fi) or not len(fo):
            raise InvalidInputError(f"need (n, k) member and non-member features, got {fi.shape} and {fo.shape}")
        if not (np.isfinite(fi).all() and np.isfinite(fo).all()):
            raise InvalidInputError("shadow features contain NaN or inf")
        x = np.concatenate([fi, fo])
        mean = x.mean(axis=0)
        scale = np.where(x.std(axis=0) > 0, x.std(axis=0), 1.0)
        xt = torch.from_numpy((x - mean) / scale)
        yt = torch.from_numpy(np.r_[np.ones(len(fi)), np.zeros(len(fo))])
        wt = torch.from_numpy(np.r_[np.full(len(fi), 0.5 / len(fi)), np.full(len(fo), 0.5 / len(fo))])
        w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros((), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = (F.binary_cross_entropy_with_logits(xt @ w + b, yt, reduction="none") * wt).sum()
            loss = loss + l2 * (w * w).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return cls(
            mean=mean.astype(np.float32),
            scale=scale.astype(np.float32),
            weights=w.detach().numpy().astype(np.float32),
            bias=float(b.detach()),
        )

    def score(self, features: npt.ArrayLike) -> FloatArray:
        """Membership logit of each row of ``features`` ``(n, k)`` (higher: more likely a member)."""
        f = np.asarray(features, dtype=np.float32)
        return np.asarray(((f - self.mean) / self.scale) @ self.weights + self.bias, dtype=np.float32)

    def auc(self, features_in: npt.ArrayLike, features_out: npt.ArrayLike) -> float:
        """AUC of telling the target's members ``features_in`` from its non-members ``features_out``."""
        si, so = self.score(features_in), self.score(features_out)
        if not (np.isfinite(si).all() and np.isfinite(so).all()):
            raise InvalidInputError("target features contain NaN or inf (diverged model)")
        return auc_score(np.concatenate([si, so]), np.r_[np.ones(si.size), np.zeros(so.size)])


__all__ = ["ShadowAttack", "attack_features", "loss_attack_auc", "slice_losses"]
