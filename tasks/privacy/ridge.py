"""Weighted ridge regression with λ chosen on a holdout: the linear learner of the privacy attacks."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from tasks.errors import InvalidInputError

__all__ = ["fit_ridge"]

FloatArray = npt.NDArray[np.float64]


def fit_ridge(
    features: npt.ArrayLike,
    targets: npt.ArrayLike,
    *,
    lambdas: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0),
    sample_weight: npt.ArrayLike | None = None,
    holdout_fraction: float = 0.2,
    rng: np.random.Generator,
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """Weighted ridge regression ``targets ≈ ((features - mean) / std) @ W + b``; λ (relative to the mean
    eigenvalue of the standardised Gram matrix) chosen on a random holdout of the fitting data, then refitted on all.

    Returns ``(mean, std, W, b)``; ``W`` is ``(d, t)``.
    """
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(targets, dtype=np.float64)
    if f.ndim != 2 or y.ndim != 2 or f.shape[0] != y.shape[0] or f.shape[0] < 1:
        raise InvalidInputError(f"features {f.shape} and targets {y.shape} must be (n, d) and (n, t), n >= 1")
    w = np.ones(f.shape[0]) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    if w.shape != (f.shape[0],) or not (np.isfinite(w).all() and (w > 0).all()):
        raise InvalidInputError(f"sample_weight must be ({f.shape[0]},) positive finite, got shape {w.shape}")
    mean = np.average(f, axis=0, weights=w)
    std = np.sqrt(np.average((f - mean) ** 2, axis=0, weights=w))
    std = np.where(std > 1e-12, std, 1.0)

    def solve(idx: npt.NDArray[np.int64], lam: float) -> tuple[FloatArray, FloatArray]:
        z, t, ww = (f[idx] - mean) / std, y[idx], w[idx]
        ym = np.average(t, axis=0, weights=ww)
        sw = np.sqrt(ww)[:, None]
        a, r = z * sw, (t - ym) * sw
        n, d = a.shape
        if n < d:  # dual form: (A Aᵀ + λ I)⁻¹ is n × n
            gram = a @ a.T
            reg = lam * max(float(np.trace(gram)) / n, 1e-12)
            coef = a.T @ np.linalg.solve(gram + reg * np.eye(n), r)
        else:
            gram = a.T @ a
            reg = lam * max(float(np.trace(gram)) / d, 1e-12)
            coef = np.linalg.solve(gram + reg * np.eye(d), a.T @ r)
        return coef, ym  # the features are centred: the intercept is the targets' weighted mean

    every = np.arange(f.shape[0])
    best = lambdas[len(lambdas) // 2]
    n_hold = round(holdout_fraction * f.shape[0])
    if len(lambdas) > 1 and n_hold >= 2 and f.shape[0] - n_hold >= 2:
        perm = rng.permutation(f.shape[0])
        hold, fit = perm[:n_hold], perm[n_hold:]
        errors = []
        for lam in lambdas:
            coef, b = solve(fit, lam)
            pred = ((f[hold] - mean) / std) @ coef + b
            errors.append(float(np.average(((pred - y[hold]) ** 2).mean(axis=1), weights=w[hold])))
        best = lambdas[int(np.argmin(errors))]
    coef, b = solve(every, best)
    return mean, std, coef, b
