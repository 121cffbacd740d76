"""The lesion crop task shared by the benchmarks: lesion-centred and background crops of demo slices.

A small CNN cannot find the demo's 1–5 px lesions in a whole 128² slice in minutes of CPU (its AUC stays at chance),
but it learns them from 32² regions of interest: positives centred on the lesion (jittered), negatives at random
body pixels. ``benchmarks/surrogate.py`` and ``benchmarks/federated.py`` use the same crops and lesions.
"""

from __future__ import annotations

import numpy as np

#: Lesions of the crop task: larger and stronger than the demo defaults, so that a small CNN can learn them from
#: crops of a 128² grid in minutes of CPU (the demo's own 15–60 HU, 3–12 mm lesions are near chance here).
LESION_RADIUS_MM = (10.0, 18.0)
LESION_CONTRAST_HU = (100.0, 250.0)


def crop_centres(
    masks: np.ndarray, body: np.ndarray, *, crop: int, per_slice: int, rng: np.random.Generator
) -> list[tuple[int, int, int]]:
    """(slice, cy, cx) of ``per_slice`` crops per slice: on a lesion slice the first is centred on the lesion
    (jittered by up to a quarter crop), the others (and all on lesion-free slices) at random body pixels whose
    crop holds no lesion pixel (background regions; labels are still recomputed from the crop's mask)."""
    n, ny, nx = masks.shape
    half = crop // 2
    out = []
    for k in range(n):
        for j in range(per_slice):
            if j == 0 and masks[k].any():
                cy, cx = np.argwhere(masks[k]).mean(axis=0)
                cy += rng.integers(-crop // 4, crop // 4 + 1)
                cx += rng.integers(-crop // 4, crop // 4 + 1)
            else:  # a background region: the first of 20 random body pixels whose crop holds no lesion pixel
                inside = np.argwhere(body[k]) if body[k].any() else np.array([[ny // 2, nx // 2]])
                for _ in range(20):
                    cy, cx = (
                        int(np.clip(v, half, e - half))
                        for v, e in zip(inside[rng.integers(len(inside))], (ny, nx), strict=True)
                    )
                    if not masks[k, cy - half : cy + half, cx - half : cx + half].any():
                        break
            out.append((k, int(np.clip(cy, half, ny - half)), int(np.clip(cx, half, nx - half))))
    return out


def cut_crops(stack: np.ndarray, centres: list[tuple[int, int, int]], *, crop: int) -> np.ndarray:
    """``(len(centres), crop, crop)`` regions of ``stack`` (``(n, ny, nx)``) at the (slice, cy, cx) centres."""
    h = crop // 2
    return np.stack([stack[s, y - h : y + h, x - h : x + h] for s, y, x in centres])
