"""Flat- and dark-field normalisation of raw projections: line integrals = −log((P − D) / (F − D)).

Bench and industrial CT deliver raw detector images ``P`` beside flat fields ``F`` (open beam) and dark fields
``D`` (no beam). Flats and darks are averaged once (:func:`average_fields`, streamed over their images), checked
(:func:`prepare_gain`: shapes, all-zero flats, darks brighter than flats, dead pixels), and each block of
projections is normalised alone (:func:`normalise_block`), so a scan is never held in memory whole.

Where ``P − D ≤ floor·(F − D)`` (no signal, or below the floor) the transmission is clamped to the floor and the
value is counted; a pixel with ``F − D ≤ 0`` is dead: its line integral is the mean of the nearest live pixels to
its left and right in the same detector row (a dead column would otherwise ring through every slice).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from tasks.errors import InvalidInputError

__all__ = ["FlatDark", "average_fields", "count_clamped", "load_field", "normalise_block", "prepare_gain"]

#: Views averaged per read when a field is a stack.
_FIELD_BLOCK = 16


@dataclass(frozen=True)
class FlatDark:
    """Averaged fields ready to normalise with: ``dark`` and ``gain = F − D`` (dead pixels repaired)."""

    dark: npt.NDArray[np.float32]  # (rows, cols)
    gain: npt.NDArray[np.float32]  # (rows, cols), > 0 everywhere
    n_flats: int
    n_darks: int
    dead_pixels: int
    mean_gain: float  # mean of F − D over live pixels: the open-beam signal
    repair: tuple[npt.NDArray[np.intp], npt.NDArray[np.intp], npt.NDArray[np.intp]] = (
        np.zeros(0, np.intp),
        np.zeros(0, np.intp),
        np.zeros(0, np.intp),
    )  # flat indices (rows·cols) of dead pixels and of their left and right live neighbours


def _neighbours(dead: npt.NDArray[np.bool_]) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """For each dead pixel, the nearest live pixel left and right in its row (at a row's end: the one side twice)."""
    cols = dead.shape[1]
    idx = np.arange(cols)
    out: tuple[list[int], list[int], list[int]] = ([], [], [])
    for r, c in zip(*np.nonzero(dead), strict=True):
        live = idx[~dead[r]]
        left, right = live[live < c], live[live > c]
        lo = int(left[-1]) if left.size else int(right[0])
        hi = int(right[0]) if right.size else lo
        out[0].append(int(r * cols + c))
        out[1].append(int(r * cols + lo))
        out[2].append(int(r * cols + hi))
    return tuple(np.asarray(v, dtype=np.intp) for v in out)  # type: ignore[return-value]


def average_fields(read: Callable[[int, int], npt.NDArray[Any]], n: int, *, where: str) -> npt.NDArray[np.float64]:
    """Mean image of a stack of ``n`` field images read in blocks (``read(a, b) -> (b - a, rows, cols)``)."""
    total: npt.NDArray[np.float64] | None = None
    for a in range(0, n, _FIELD_BLOCK):
        block = np.asarray(read(a, min(n, a + _FIELD_BLOCK)), dtype=np.float64)
        if not np.isfinite(block).all():
            raise InvalidInputError(f"{where}: non-finite values in the field images")
        part = block.sum(axis=0)
        total = part if total is None else total + part
    assert total is not None
    return total / n


def load_field(path: Path, *, key: str) -> tuple[npt.NDArray[np.float64], int]:
    """Average one field file: NPY/TIFF of ``(rows, cols)`` or ``(n, rows, cols)``, or NPZ member ``key``."""
    import zipfile

    suffix = path.suffix.lower()
    if not path.is_file():
        raise InvalidInputError(f"{path}: no such {key} file")
    try:
        if suffix == ".npy":
            arr: Any = np.load(path, mmap_mode="r", allow_pickle=False)
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                if key not in npz.files:
                    raise InvalidInputError(f"{path}: no member {key!r} (members: {list(npz.files)})")
                arr = np.asarray(npz[key])
        elif suffix in (".tif", ".tiff"):
            import tifffile

            arr = np.asarray(tifffile.imread(path))
        else:
            raise InvalidInputError(f"{path}: {key} must be NPY, NPZ or TIFF, not {suffix or 'no suffix'}")
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        if isinstance(exc, InvalidInputError):
            raise
        raise InvalidInputError(f"{path}: cannot read the {key} ({type(exc).__name__}: {exc})") from exc
    return fields_mean(arr, where=f"{path} ({key})")


def fields_mean(arr: Any, *, where: str) -> tuple[npt.NDArray[np.float64], int]:
    """Average an in-memory or memory-mapped ``(rows, cols)`` or ``(n, rows, cols)`` field array."""
    if arr.dtype.kind not in "iuf":
        raise InvalidInputError(f"{where}: unsupported data type {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or 0 in arr.shape:
        raise InvalidInputError(f"{where}: expected (rows, cols) or (n, rows, cols) images, got shape {arr.shape}")
    n = int(arr.shape[0])
    return average_fields(lambda a, b: arr[a:b], n, where=where), n


def prepare_gain(
    flat: npt.NDArray[np.float64],
    dark: npt.NDArray[np.float64] | None,
    *,
    shape: tuple[int, int],
    n_flats: int,
    n_darks: int,
    where: str,
) -> FlatDark:
    """Check averaged fields against the projections' ``(rows, cols)`` and build the gain ``F − D``.

    Raises
    ------
    InvalidInputError
        Flats or darks of another shape, all-zero flats, darks brighter than flats, no live pixel.
    """
    if flat.shape != shape:
        raise InvalidInputError(f"{where}: flats of shape {flat.shape}, but projections are {shape} (rows, cols)")
    if dark is not None and dark.shape != shape:
        raise InvalidInputError(f"{where}: darks of shape {dark.shape}, but projections are {shape} (rows, cols)")
    if not np.any(flat):
        raise InvalidInputError(f"{where}: flats are all zero (no open-beam signal)")
    d = np.zeros(shape) if dark is None else dark
    if float(d.mean()) >= float(flat.mean()):
        raise InvalidInputError(
            f"{where}: darks are brighter than flats (mean dark {d.mean():.4g} ≥ mean flat {flat.mean():.4g}); "
            "flats and darks swapped?"
        )
    gain = flat - d
    dead = gain <= 0
    n_dead = int(dead.sum())
    if (~dead).sum(axis=1).min() == 0:
        r = int(np.flatnonzero((~dead).sum(axis=1) == 0)[0])
        raise InvalidInputError(f"{where}: detector row {r} has no live pixel (flat ≤ dark everywhere in it)")
    live = gain[~dead]
    median = float(np.median(live))
    gain = np.where(dead, median, gain)
    return FlatDark(
        dark=d.astype(np.float32),
        gain=gain.astype(np.float32),
        n_flats=n_flats,
        n_darks=n_darks,
        dead_pixels=n_dead,
        mean_gain=float(live.mean()),
        repair=_neighbours(dead),
    )


def normalise_block(
    raw: npt.ArrayLike,
    *,
    dark: npt.ArrayLike,
    gain: npt.ArrayLike,
    floor_fraction: float,
    repair: tuple[npt.NDArray[np.intp], npt.NDArray[np.intp], npt.NDArray[np.intp]] | None = None,
) -> tuple[npt.NDArray[np.float32], int]:
    """Line integrals of one block of raw projections, and how many values were clamped.

    Parameters
    ----------
    raw : array_like
        ``(views, rows, cols)`` raw detector values ``P``.
    dark, gain : array_like
        ``(rows, cols)`` averaged dark ``D`` and ``F − D`` (> 0).
    floor_fraction : float
        Transmissions ``(P − D) / (F − D)`` below this are clamped to it (and counted), in (0, 1).
    repair : tuple of int arrays, optional
        Flat ``(rows·cols)`` indices of dead pixels and of their left and right live neighbours
        (:attr:`FlatDark.repair`); dead pixels take their neighbours' mean and are not counted.

    Returns
    -------
    line : ndarray
        ``−log((P − D) / (F − D))``, float32, same shape as ``raw``.
    clamped : int
        Values at or below the floor.
    """
    if not 0 < floor_fraction < 1:
        raise ValueError(f"floor_fraction must be in (0, 1), got {floor_fraction}")
    p = np.asarray(raw, dtype=np.float32)
    floor = np.float32(floor_fraction)
    # one float32 buffer, transformed in place (transmission → clamped → line integral): no temporaries
    line = np.subtract(p, np.asarray(dark, dtype=np.float32), dtype=np.float32)
    line /= np.asarray(gain, dtype=np.float32)
    low = line <= floor
    np.maximum(line, floor, out=line)
    np.log(line, out=line)
    np.negative(line, out=line)
    if repair is not None and repair[0].size:
        dead, left, right = repair
        flat_line = line.reshape(line.shape[0], -1)
        flat_line[:, dead] = 0.5 * (flat_line[:, left] + flat_line[:, right])
        low.reshape(low.shape[0], -1)[:, dead] = False
    return line.astype(np.float32, copy=False), int(np.count_nonzero(low))


def count_clamped(raw: npt.ArrayLike, fields: FlatDark, *, floor_fraction: float) -> int:
    """How many values of a raw block :func:`normalise_block` will clamp (live pixels only), without the log."""
    p = np.asarray(raw, dtype=np.float32)
    low = (p - fields.dark) <= np.float32(floor_fraction) * fields.gain
    dead = fields.repair[0]
    if dead.size:
        low.reshape(low.shape[0], -1)[:, dead] = False
    return int(np.count_nonzero(low))
