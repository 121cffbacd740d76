"""Uplink compression of model updates (plain numpy; no Flower).

A client sends ``delta = local − global`` instead of its weights:

* ``float16``: every delta entry in half precision (2 bytes instead of 4), all of them in one flat vector
  :data:`FLOAT16_DELTA` in the order of the reference's keys: one array in the message instead of one per
  tensor, so the per-array overhead (name, dtype, shape, numpy header) is paid once.
* ``topk``: the ``⌈fraction·N⌉`` entries of largest magnitude over the whole update, as int32 flat indices and
  float32 values (8 bytes per kept entry). What is left out is kept by the client and added to its next update
  (error feedback, Stich et al. 2018 / Karimireddy et al. 2019), so nothing is lost, only delayed.

:func:`decode_update` rebuilds ``global + delta`` on the server.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from schemas.federation import CompressionKind
from tasks.errors import InvalidInputError

FloatArray = npt.NDArray[np.float32]
TOPK_INDICES = "topk.indices"
TOPK_VALUES = "topk.values"
FLOAT16_DELTA = "float16.delta"


def _flat(arrays: Mapping[str, npt.ArrayLike], keys: Sequence[str]) -> npt.NDArray[np.float32]:
    return (
        np.concatenate([np.asarray(arrays[k], dtype=np.float32).ravel() for k in keys])
        if keys
        else np.zeros(0, np.float32)
    )


def encode_update(
    local: Mapping[str, npt.ArrayLike],
    reference: Mapping[str, npt.ArrayLike],
    *,
    kind: CompressionKind | str,
    topk_fraction: float = 0.1,
    residual: npt.ArrayLike | None = None,
) -> tuple[dict[str, npt.NDArray[np.generic]], FloatArray | None]:
    """Encode ``local − reference`` (plus the carried ``residual`` for top-k).

    Returns
    -------
    encoded : dict of str to ndarray
        ``{FLOAT16_DELTA: flat float16 delta}`` (float16), ``{TOPK_INDICES, TOPK_VALUES}`` (top-k) or
        ``{key: float32 delta}`` (none).
    residual : ndarray of float32, shape (N,), or None
        Top-k only: the part of the update not sent, to pass back in next round.
    """
    kind = CompressionKind(kind)
    keys = list(reference)
    if set(local) != set(keys):
        raise InvalidInputError(f"local keys {sorted(local)[:3]}… differ from the reference keys")
    for k in keys:
        if np.shape(local[k]) != np.shape(reference[k]):
            raise InvalidInputError(f"{k!r}: local shape {np.shape(local[k])} != reference {np.shape(reference[k])}")
    if kind is CompressionKind.NONE:
        return {k: np.asarray(local[k], np.float32) - np.asarray(reference[k], np.float32) for k in keys}, None
    if kind is CompressionKind.FLOAT16:
        return {FLOAT16_DELTA: (_flat(local, keys) - _flat(reference, keys)).astype(np.float16)}, None
    if not 0 < topk_fraction <= 1:
        raise InvalidInputError(f"topk_fraction must be in (0, 1], got {topk_fraction}")
    delta = _flat(local, keys) - _flat(reference, keys)
    if residual is not None:
        r = np.asarray(residual, dtype=np.float32)
        if r.shape == delta.shape:
            delta = delta + r
    k_keep = min(delta.size, max(1, math.ceil(topk_fraction * delta.size)))
    idx = np.argpartition(np.abs(delta), delta.size - k_keep)[delta.size - k_keep :]
    idx = np.sort(idx).astype(np.int32)
    values = delta[idx].astype(np.float32)
    left = delta.copy()
    left[idx] = 0.0
    return {TOPK_INDICES: idx, TOPK_VALUES: values}, left


def decode_update(
    encoded: Mapping[str, npt.ArrayLike],
    reference: Mapping[str, npt.ArrayLike],
    *,
    kind: CompressionKind | str,
) -> dict[str, FloatArray]:
    """``reference + delta`` for every key of ``reference`` (float32).

    Raises
    ------
    InvalidInputError
        Missing keys, wrong shapes or out-of-range top-k indices.
    """
    kind = CompressionKind(kind)
    keys = list(reference)
    ref = {k: np.asarray(reference[k], dtype=np.float32) for k in keys}
    if kind is CompressionKind.FLOAT16:
        if set(encoded) != {FLOAT16_DELTA}:
            raise InvalidInputError(f"a float16 update holds {FLOAT16_DELTA!r} only, got {sorted(encoded)[:3]}")
        delta = np.asarray(encoded[FLOAT16_DELTA])
        total = sum(ref[k].size for k in keys)
        if delta.shape != (total,):
            raise InvalidInputError(f"float16 update has shape {delta.shape}, the model {total} values")
        flat = _flat(ref, keys) + delta.astype(np.float32)
        return _unflatten(flat, ref)
    if kind is not CompressionKind.TOPK:
        if set(encoded) != set(keys):
            raise InvalidInputError(
                f"update keys differ from the model's: missing {sorted(set(keys) - set(encoded))[:3]}, "
                f"unknown {sorted(set(encoded) - set(keys))[:3]}"
            )
        out = {}
        for k in keys:
            d = np.asarray(encoded[k])
            if d.shape != ref[k].shape:
                raise InvalidInputError(f"update {k!r} has shape {d.shape}, the model {ref[k].shape}")
            out[k] = ref[k] + d.astype(np.float32)
        return out
    if set(encoded) != {TOPK_INDICES, TOPK_VALUES}:
        raise InvalidInputError(f"a top-k update holds {TOPK_INDICES!r} and {TOPK_VALUES!r}, got {sorted(encoded)}")
    idx = np.asarray(encoded[TOPK_INDICES])
    values = np.asarray(encoded[TOPK_VALUES], dtype=np.float32)
    total = sum(ref[k].size for k in keys)
    if idx.shape != values.shape or idx.ndim != 1 or (idx.size and (idx.min() < 0 or idx.max() >= total)):
        raise InvalidInputError(f"top-k update malformed: {idx.shape} indices, {values.shape} values, N={total}")
    flat = _flat(ref, keys)
    flat[idx.astype(np.int64)] += values
    return _unflatten(flat, ref)


def _unflatten(flat: FloatArray, ref: Mapping[str, FloatArray]) -> dict[str, FloatArray]:
    out, start = {}, 0
    for k, r in ref.items():
        out[k] = flat[start : start + r.size].reshape(r.shape).copy()
        start += r.size
    return out


def payload_bytes(arrays: Mapping[str, npt.ArrayLike]) -> int:
    """Bytes of the array data (what dominates a message)."""
    return int(sum(np.asarray(a).nbytes for a in arrays.values()))
