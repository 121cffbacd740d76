"""Detected photon counts to line integrals, shared by ingest and the demo data (pure numpy)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["counts_to_line_integrals"]


def counts_to_line_integrals(
    counts: npt.ArrayLike, *, i0_photons: float, counts_floor: float = 0.5
) -> npt.NDArray[np.float32]:
    """Line integrals ``p = log(I0 / max(counts, floor))``.

    A bin that detected no photons has an unbounded line integral; scanners clamp such bins to a small
    positive count before the log, and so does this (``counts_floor`` photons, default half a photon).

    Parameters
    ----------
    counts : array_like
        Detected photons, any shape, non-negative.
    i0_photons : float
        Unattenuated photons per bin.
    counts_floor : float
        Clamp for zero/low counts, photons (> 0).
    """
    if i0_photons <= 0 or counts_floor <= 0:
        raise ValueError(f"i0_photons ({i0_photons}) and counts_floor ({counts_floor}) must be positive")
    c = np.maximum(np.asarray(counts, dtype=np.float32), np.float32(counts_floor))
    return np.log(np.float32(i0_photons) / c).astype(np.float32, copy=False)
