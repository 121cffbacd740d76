"""Can a classifier tell surrogates from the host domain? (What IQEM is for, measured.)

FESF's IQEM is meant to make surrogates look like members of the host domain K. The test: a discriminator (the
small CNN of :mod:`tasks.surrogate.evaluation`, per-image standardised inputs, random flips) trained on half of
the surrogates against half of a set of host-domain images, scored on the other halves. AUC 0.5: indistinguishable;
1: always told apart. One AUC per seed (a seed fixes the split, the initial weights and the batch order).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from tasks.errors import InvalidInputError
from tasks.surrogate.evaluation import TrainSettings, auc_score, classifier_scores, train_classifier

__all__ = ["discriminator_aucs"]


def discriminator_aucs(
    surrogates: npt.ArrayLike,
    domain: npt.ArrayLike,
    *,
    seeds: Sequence[int],
    settings: TrainSettings,
    test_fraction: float = 0.5,
) -> list[float]:
    """Held-out AUC of telling ``surrogates`` (positive) from ``domain`` images (negative), one per seed.

    Parameters
    ----------
    surrogates, domain : array_like
        ``(n, ny, nx)`` and ``(m, ny, nx)``, at least 2 each.
    seeds : sequence of int
        One run per seed: split, initial weights and batch order.
    settings : TrainSettings
        Steps, batch size, learning rate, device (its seed is replaced by each of ``seeds``).
    test_fraction : float
        Share of each class held out for the AUC.

    Raises
    ------
    InvalidInputError
        Stacks of other sizes, fewer than 2 images in a class, no seeds.
    """
    s = np.asarray(surrogates, dtype=np.float32)
    d = np.asarray(domain, dtype=np.float32)
    if s.ndim != 3 or d.ndim != 3 or s.shape[1:] != d.shape[1:]:
        raise InvalidInputError(f"surrogates {s.shape} and domain {d.shape} must be (n, ny, nx) of one size")
    if len(s) < 2 or len(d) < 2:
        raise InvalidInputError(f"need at least 2 images per class, got {len(s)} surrogates and {len(d)} domain")
    if not seeds:
        raise InvalidInputError("no seeds")
    if not 0 < test_fraction < 1:
        raise InvalidInputError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    x = np.concatenate([s, d])
    y = np.concatenate([np.ones(len(s), dtype=np.int64), np.zeros(len(d), dtype=np.int64)])
    aucs = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        test = np.zeros(len(x), dtype=bool)
        for cls in (0, 1):
            idx = np.flatnonzero(y == cls)
            n_test = min(len(idx) - 1, max(1, round(test_fraction * len(idx))))
            test[rng.choice(idx, n_test, replace=False)] = True
        net = train_classifier(x[~test], y[~test], settings=TrainSettings(**{**settings.__dict__, "seed": seed}))
        aucs.append(auc_score(classifier_scores(net, x[test]), y[test]))
    return aucs
