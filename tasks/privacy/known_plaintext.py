"""Known plaintext: an attacker who holds k (private image, surrogate) pairs of one site inverts its other surrogates.

A fixed host acts like a key; block-wise keyed image encryption fell to a single known pair. Here the attacker
learns a linear inverse (ridge regression, :func:`tasks.privacy.ridge.fit_ridge`) from a surrogate's features —
its pixels and the estimated private log-amplitude inside the mask (:func:`inversion_features`) — to the private
pixels, and applies it to the site's other surrogates. It can fit on the k site pairs alone, on public pairs it
made itself (public images hidden under the same configuration and the identified host: the *no-pair* attack), or
on both with the site pairs weighted up to the public ones' total weight. :func:`known_plaintext_attack` returns
all three; a benchmark reports the best, which favours the attacker.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from tasks.errors import InvalidInputError
from tasks.privacy.linkage import embedded_log_amplitude
from tasks.privacy.ridge import fit_ridge
from tasks.surrogate.evaluation import TrainSettings, predict, train_regressor

__all__ = [
    "LinearInverse",
    "fit_inverse",
    "inversion_features",
    "known_plaintext_attack",
    "known_plaintext_network_attack",
]

FloatArray = npt.NDArray[np.float64]


def inversion_features(
    surrogates: npt.ArrayLike, *, alpha: float, beta: float, hosts: npt.ArrayLike | None = None
) -> FloatArray:
    """``(n, ny·nx + bins)``: each surrogate's pixels, then its estimated private log-amplitude inside the mask
    (:func:`tasks.privacy.linkage.embedded_log_amplitude`; with α = 0 the pixels alone)."""
    s = np.asarray(surrogates, dtype=np.float64)
    if s.ndim != 3 or s.shape[0] == 0:
        raise InvalidInputError(f"surrogates must be a non-empty (n, ny, nx) stack, got shape {s.shape}")
    pixels = s.reshape(s.shape[0], -1)
    if alpha == 0:
        return pixels
    return np.concatenate([pixels, embedded_log_amplitude(s, alpha=alpha, beta=beta, hosts=hosts)], axis=1)


@dataclass(frozen=True)
class LinearInverse:
    """A fitted ridge map from :func:`inversion_features` to private images of ``shape``."""

    mean: FloatArray
    std: FloatArray
    weights: FloatArray
    bias: FloatArray
    shape: tuple[int, int]

    def __call__(self, features: npt.ArrayLike) -> npt.NDArray[np.float32]:
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or f.shape[1] != self.mean.shape[0]:
            raise InvalidInputError(f"features must be (n, {self.mean.shape[0]}), got shape {f.shape}")
        out = ((f - self.mean) / self.std) @ self.weights + self.bias
        return out.reshape(f.shape[0], *self.shape).astype(np.float32)


def fit_inverse(
    features: npt.ArrayLike,
    images: npt.ArrayLike,
    *,
    rng: np.random.Generator,
    sample_weight: npt.ArrayLike | None = None,
) -> LinearInverse:
    """Ridge from surrogate features ``(n, d)`` to private images ``(n, ny, nx)`` (λ by holdout)."""
    y = np.asarray(images, dtype=np.float64)
    if y.ndim != 3:
        raise InvalidInputError(f"images must be (n, ny, nx), got shape {y.shape}")
    mean, std, w, b = fit_ridge(features, y.reshape(y.shape[0], -1), sample_weight=sample_weight, rng=rng)
    return LinearInverse(mean, std, w, b, (y.shape[1], y.shape[2]))


def known_plaintext_attack(
    pairs: tuple[npt.ArrayLike, npt.ArrayLike] | None,
    surrogates: npt.ArrayLike,
    *,
    alpha: float,
    beta: float,
    rng: np.random.Generator,
    public: tuple[npt.ArrayLike, npt.ArrayLike] | None = None,
    pair_hosts: npt.ArrayLike | None = None,
    hosts: npt.ArrayLike | None = None,
    public_hosts: npt.ArrayLike | None = None,
) -> dict[str, npt.NDArray[np.float32]]:
    """Reconstructions of ``surrogates`` by every strategy the attacker's data allow.

    Parameters
    ----------
    pairs : (surrogates, private images), optional
        The k known pairs of the site, ``(k, ny, nx)`` each.
    surrogates : array_like
        ``(n, ny, nx)`` the site's other surrogates, to invert.
    alpha, beta : float
        The public configuration.
    rng : numpy.random.Generator
        The holdout split that picks λ.
    public : (surrogates, images), optional
        Pairs the attacker made from public images under the same configuration and host.
    pair_hosts, hosts, public_hosts : array_like, optional
        The identified host(s) of each set (``(ny, nx)`` or one per image); None: the amplitude is not corrected.

    Returns
    -------
    dict
        ``"pairs"`` (site pairs alone), ``"public"`` (public pairs alone: the no-pair attack) and
        ``"public+pairs"`` (site pairs weighted to the public pairs' total), each ``(n, ny, nx)`` float32; only
        the strategies the data allow.

    Raises
    ------
    InvalidInputError
        No pairs and no public data, or stacks that do not match.
    """
    if pairs is None and public is None:
        raise InvalidInputError("the known-plaintext attack needs site pairs or public pairs; got neither")
    target = inversion_features(surrogates, alpha=alpha, beta=beta, hosts=hosts)
    out: dict[str, npt.NDArray[np.float32]] = {}
    sets: dict[str, tuple[FloatArray, FloatArray]] = {}
    for name, data, h in (("pairs", pairs, pair_hosts), ("public", public, public_hosts)):
        if data is None:
            continue
        s, x = np.asarray(data[0], dtype=np.float64), np.asarray(data[1], dtype=np.float64)
        size = np.shape(surrogates)[1:]
        if s.shape != x.shape or s.ndim != 3 or s.shape[1:] != size:
            raise InvalidInputError(
                f"{name}: surrogates {s.shape} and images {x.shape} must be equal (k, ny, nx) stacks of size {size}"
            )
        sets[name] = (inversion_features(s, alpha=alpha, beta=beta, hosts=h), x)
    for name, (f, x) in sets.items():
        out[name] = fit_inverse(f, x, rng=rng)(target)
    if len(sets) == 2:
        (fp, xp), (fq, xq) = sets["pairs"], sets["public"]
        weight = np.concatenate([np.full(len(fp), len(fq) / len(fp)), np.ones(len(fq))])
        inv = fit_inverse(np.concatenate([fp, fq]), np.concatenate([xp, xq]), rng=rng, sample_weight=weight)
        out["public+pairs"] = inv(target)
    return out


def known_plaintext_network_attack(
    pairs: tuple[npt.ArrayLike, npt.ArrayLike] | None,
    surrogates: npt.ArrayLike,
    *,
    public: tuple[npt.ArrayLike, npt.ArrayLike],
    settings: TrainSettings,
) -> npt.NDArray[np.float32]:
    """The nonlinear attacker: the inversion U-Net of :mod:`tasks.surrogate.evaluation` trained on public pairs
    and, when given, the k site pairs repeated until they are as many as the public ones (about half of every
    batch). Returns ``(n, ny, nx)`` reconstructions of ``surrogates``; ``ny, nx`` divisible by 4.
    """
    s_pub, x_pub = np.asarray(public[0], dtype=np.float32), np.asarray(public[1], dtype=np.float32)
    if s_pub.shape != x_pub.shape or s_pub.ndim != 3:
        raise InvalidInputError(f"public surrogates {s_pub.shape} and images {x_pub.shape} must be equal stacks")
    inputs, targets = s_pub, x_pub
    if pairs is not None:
        s_k, x_k = np.asarray(pairs[0], dtype=np.float32), np.asarray(pairs[1], dtype=np.float32)
        if s_k.shape != x_k.shape or s_k.shape[1:] != s_pub.shape[1:] or len(s_k) == 0:
            raise InvalidInputError(f"pairs {s_k.shape} / {x_k.shape} must be equal stacks of size {s_pub.shape[1:]}")
        reps = max(1, len(s_pub) // len(s_k))
        inputs = np.concatenate([s_pub, np.tile(s_k, (reps, 1, 1))])
        targets = np.concatenate([x_pub, np.tile(x_k, (reps, 1, 1))])
    net = train_regressor(inputs, targets, settings=settings)
    return predict(net, np.asarray(surrogates, dtype=np.float32))
