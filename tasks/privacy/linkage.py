"""Linkage: which of N candidate private images a surrogate was made from.

An FESF surrogate carries its private image's low-frequency amplitude inside the mask (mixed with the host's,
ratio β). An attacker who has candidate plaintext images (other slices of the same patient, other patients) and
knows the public configuration (α, β) and the host (identified from the surrogate itself:
:func:`tasks.surrogate.evaluation.identify_hosts`) compares amplitudes inside the mask.

* :func:`embedded_log_amplitude`: the attacker's estimate of ``log |X|`` inside the mask from a surrogate,
  ``(|S| - (1 - β)|H|) / β`` when the host is known, else ``|S|``.
* :func:`mask_log_amplitude`: the same features of the candidates (``log |X|`` inside the mask).
* :class:`FeatureMap`: the learned matcher, ridge regression from surrogate features to candidate features
  fitted on public pairs (:func:`fit_feature_map`).
* :func:`top1_accuracy`: each query against its true image and ``n_candidates - 1`` others (half of them, when
  available, from the same group: the same patient's other slices); Pearson correlation of the features decides.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from tasks.errors import InvalidInputError
from tasks.privacy.ridge import fit_ridge
from tasks.surrogate.kernels import check_strengths, low_frequency_mask

__all__ = [
    "FeatureMap",
    "correlation_matrix",
    "embedded_log_amplitude",
    "fit_feature_map",
    "mask_log_amplitude",
    "top1_accuracy",
]

FloatArray = npt.NDArray[np.float64]
#: Floor of an amplitude before its log, in the units of an image's FFT (pixel values in [0, 1] times pixels).
_AMPLITUDE_FLOOR = 1e-3


def _stack(name: str, images: npt.ArrayLike) -> FloatArray:
    x = np.asarray(images, dtype=np.float64)
    if x.ndim != 3 or x.shape[0] == 0:
        raise InvalidInputError(f"{name} must be a non-empty (n, ny, nx) stack, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise InvalidInputError(f"{name} contain NaN or infinite values")
    return x


def _mask_bins(shape: tuple[int, int], alpha: float) -> npt.NDArray[np.bool_]:
    """The mask's bins with ``k_x >= 0``: a real image's spectrum is Hermitian, so the other half repeats them."""
    mask = low_frequency_mask(shape, alpha=alpha)
    w = shape[1]
    mask[:, np.arange(w) > w // 2] = False
    if not mask.any():
        raise InvalidInputError(f"alpha={alpha} leaves no frequency inside the mask at size {shape}")
    return mask


def mask_log_amplitude(images: npt.ArrayLike, *, alpha: float) -> FloatArray:
    """``(n, bins)`` ``log |X|`` of each image inside the mask (half-plane, floor ``1e-3``)."""
    x = _stack("images", images)
    bins = _mask_bins(x.shape[-2:], alpha)
    return np.log(np.maximum(np.abs(np.fft.fft2(x))[:, bins], _AMPLITUDE_FLOOR))


def embedded_log_amplitude(
    surrogates: npt.ArrayLike, *, alpha: float, beta: float, hosts: npt.ArrayLike | None = None
) -> FloatArray:
    """The attacker's ``(n, bins)`` estimate of the private ``log |X|`` inside the mask of each surrogate.

    Parameters
    ----------
    surrogates : array_like
        ``(n, ny, nx)``.
    alpha, beta : float
        The public configuration.
    hosts : array_like, optional
        ``(ny, nx)`` or ``(n, ny, nx)``, the identified hosts: the host's share is subtracted and the rest divided
        by β. Without hosts (or β = 0) the surrogate's own amplitude is the estimate.
    """
    check_strengths(alpha=alpha, beta=beta)
    s = _stack("surrogates", surrogates)
    bins = _mask_bins(s.shape[-2:], alpha)
    amp = np.abs(np.fft.fft2(s))[:, bins]
    if hosts is not None and beta > 0:
        h = np.asarray(hosts, dtype=np.float64)
        if h.shape[-2:] != s.shape[-2:] or h.ndim not in (2, 3) or (h.ndim == 3 and h.shape[0] != s.shape[0]):
            raise InvalidInputError(f"hosts {h.shape} must be (ny, nx) or one per surrogate of {s.shape}")
        host_amp = np.abs(np.fft.fft2(h))[..., bins]
        amp = (amp - (1.0 - beta) * host_amp) / beta
    return np.log(np.maximum(amp, _AMPLITUDE_FLOOR))


@dataclass(frozen=True)
class FeatureMap:
    """A fitted ridge map from surrogate features to private features (the learned matcher)."""

    mean: FloatArray
    std: FloatArray
    weights: FloatArray
    bias: FloatArray

    def __call__(self, features: npt.ArrayLike) -> FloatArray:
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or f.shape[1] != self.mean.shape[0]:
            raise InvalidInputError(f"features must be (n, {self.mean.shape[0]}), got shape {f.shape}")
        return ((f - self.mean) / self.std) @ self.weights + self.bias


def fit_feature_map(
    surrogate_features: npt.ArrayLike, private_features: npt.ArrayLike, *, rng: np.random.Generator
) -> FeatureMap:
    """Ridge from surrogate features to private features, fitted on *public* pairs (λ by holdout)."""
    return FeatureMap(*fit_ridge(surrogate_features, private_features, rng=rng))


def correlation_matrix(queries: npt.ArrayLike, candidates: npt.ArrayLike) -> FloatArray:
    """``(n_q, n_c)`` Pearson correlation of every query feature vector with every candidate's."""
    q = np.asarray(queries, dtype=np.float64)
    c = np.asarray(candidates, dtype=np.float64)
    if q.ndim != 2 or c.ndim != 2 or q.shape[1] != c.shape[1]:
        raise InvalidInputError(f"queries {q.shape} and candidates {c.shape} must be (n, d) with equal d")

    def z(a: FloatArray) -> FloatArray:
        a = a - a.mean(axis=1, keepdims=True)
        norm = np.linalg.norm(a, axis=1, keepdims=True)
        return a / np.where(norm > 0, norm, 1.0)

    return z(q) @ z(c).T


def top1_accuracy(
    scores: npt.ArrayLike,
    *,
    n_candidates: int,
    rng: np.random.Generator,
    groups: npt.ArrayLike | None = None,
    trials: int = 1,
) -> float:
    """Expected top-1 accuracy of picking each query's true candidate among ``n_candidates``.

    Parameters
    ----------
    scores : array_like
        ``(n, n)`` similarity of query ``i`` to candidate ``j``; candidate ``i`` is query ``i``'s true image.
    n_candidates : int
        N, the true image plus N - 1 distractors drawn per query (``2 <= N <= n``).
    rng : numpy.random.Generator
    groups : array_like, optional
        ``(n,)`` group of each image (a patient or scan): up to half the distractors come from the query's own
        group (its other slices), the rest from everyone else.
    trials : int
        Independent draws of distractors per query, averaged.

    Returns
    -------
    float
        Mean over queries and trials of ``1 / (1 + ties)`` when no distractor scores above the true image, else 0.
        Chance is ``1 / N``.
    """
    s = np.asarray(scores, dtype=np.float64)
    n = s.shape[0]
    if s.ndim != 2 or s.shape[1] != n:
        raise InvalidInputError(f"scores must be square (n, n), got shape {s.shape}")
    if not (isinstance(n_candidates, int) and 2 <= n_candidates <= n):
        raise InvalidInputError(f"n_candidates must be an int in [2, {n}], got {n_candidates!r}")
    g = np.zeros(n, dtype=np.int64) if groups is None else np.asarray(groups)
    if g.shape != (n,):
        raise InvalidInputError(f"groups must be ({n},), got shape {g.shape}")
    hits = []
    everyone = np.arange(n)
    for i in range(n):
        same = everyone[(g == g[i]) & (everyone != i)]
        other = everyone[g != g[i]]
        for _ in range(trials):
            k_same = min(len(same), (n_candidates - 1) // 2 if groups is not None else n_candidates - 1)
            k_other = n_candidates - 1 - k_same
            if k_other > len(other):  # not enough other patients: fill from the same group
                k_other = len(other)
                k_same = n_candidates - 1 - k_other
            picked = np.concatenate(
                [rng.choice(same, k_same, replace=False), rng.choice(other, k_other, replace=False)]
            ).astype(np.int64)
            true, rest = s[i, i], s[i, picked]
            hits.append(0.0 if (rest > true).any() else 1.0 / (1 + int((rest == true).sum())))
    return float(np.mean(hits))
