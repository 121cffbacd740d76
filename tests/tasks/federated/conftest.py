"""Fixtures of the federated tests: small synthetic site stores (surrogate stage outputs only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tasks.federated.data import write_site_surrogates

SIZE = 32


def synthetic_scans(
    rng: np.random.Generator, *, n_scans: int, n_slices: int, size: int = SIZE, gain: float = 1.0, offset: float = 0.0
) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """Smooth random backgrounds; half the slices carry a bright disc (the lesion) of radius 3-5 px."""
    yy, xx = np.mgrid[:size, :size]
    scans = []
    for s in range(n_scans):
        base = rng.normal(size=(n_slices, size // 4, size // 4)).repeat(4, axis=1).repeat(4, axis=2)
        labels = (rng.random(n_slices) < 0.5).astype(np.uint8)
        masks = np.zeros((n_slices, size, size), dtype=np.uint8)
        for k in np.flatnonzero(labels):
            cy, cx = rng.integers(8, size - 8, size=2)
            r = rng.uniform(3, 5)
            masks[k] = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.uint8)
        images = (gain * (0.3 * base + 2.5 * masks) + offset).astype(np.float32)
        scans.append((f"scan-{s}", images, labels, masks))
    return scans


def make_site(path: Path, site_id: str, seed: int, *, n_scans: int = 4, n_slices: int = 12) -> Path:
    rng = np.random.default_rng(seed)
    gain, offset = 1.0 + 0.3 * seed, 0.2 * seed
    write_site_surrogates(
        path, site_id=site_id, scans=synthetic_scans(rng, n_scans=n_scans, n_slices=n_slices, gain=gain, offset=offset)
    )
    return path


@pytest.fixture(scope="module")
def site_stores(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("sites")
    return [make_site(root / f"{sid}.zarr", sid, k) for k, sid in enumerate("ABC")]
