"""A site's training data for federated learning: surrogate slices and their targets, read from its own store.

A ClientApp calls :func:`load_site_data` with the path from its node config and gets only what the surrogate
stage wrote (``surrogate``, ``labels``, and ``lesion_masks`` for segmentation); plaintext volumes and
projections in the same store are never read. A scan counts only once its surrogate stage is done (its
provenance record, written after the last chunk, names the array): a surrogate that is still being written, or
whose writer died, is skipped and the reason logged. :func:`split_holdout` keeps a deterministic share of the slices
for the site's local evaluation. :func:`write_site_surrogates` builds such stores for tests and benchmarks
from demo scans.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numpy as np
import numpy.typing as npt

from schemas.base import StageConfig
from schemas.federation import FederatedTask
from schemas.geometry import ReconGrid
from schemas.manifest import DataKind, ScanManifest
from schemas.stages import StageName, spec_of
from tasks.errors import InvalidInputError
from tasks.storage import ScanStore, SiteStore, StageOutput

#: The stage whose output federated training reads, and that output (from the stage registry).
SURROGATE_STAGE = StageName.SURROGATE.value
SURROGATE_ARRAY = spec_of(StageName.SURROGATE).writes[0]
LABELS_ARRAY = "labels"
MASKS_ARRAY = "lesion_masks"
LOG = logging.getLogger("fedscan.federated.data")


@dataclass(frozen=True)
class SiteData:
    """One site's surrogate slices with their targets, and which scan each slice came from."""

    site_id: str
    images: npt.NDArray[np.float32]  # (n, H, W) surrogate slices
    targets: npt.NDArray[np.uint8]  # (n,) labels or (n, H, W) masks
    scan_index: npt.NDArray[np.int32]  # (n,) index of the slice's scan in the store's sorted scan list

    @property
    def num_slices(self) -> int:
        return int(self.images.shape[0])


def load_site_data(store_path: str | Path, *, task: FederatedTask | str) -> SiteData:
    """Read every scan of a site store whose surrogate stage is done and that has targets.

    Other scans are skipped, each with a logged reason (:func:`unusable_reason`).

    Raises
    ------
    StoreNotFoundError
        No store at ``store_path``.
    InvalidInputError
        No scan holds both surrogates and targets, or their shapes disagree.
    """
    task = FederatedTask(task)
    site = SiteStore.open(store_path, mode="r")
    target_name = LABELS_ARRAY if task is FederatedTask.CLASSIFY else MASKS_ARRAY
    images: list[npt.NDArray[np.float32]] = []
    targets: list[npt.NDArray[np.uint8]] = []
    index: list[npt.NDArray[np.int32]] = []
    skipped: list[str] = []
    for k, scan in enumerate(site.scans()):
        reason = unusable_reason(scan, target_name)
        if reason:
            LOG.warning("site %s: scan %s skipped: %s", site.site_id, scan.scan_id, reason)
            skipped.append(scan.scan_id)
            continue
        x = np.asarray(scan.array(SURROGATE_ARRAY)[...], dtype=np.float32)
        y = np.asarray(scan.array(target_name)[...])
        expected = x.shape[:1] if task is FederatedTask.CLASSIFY else x.shape
        if x.ndim != 3 or tuple(y.shape) != tuple(expected):
            raise InvalidInputError(
                f"scan {scan.scan_id!r} of site {site.site_id!r}: {SURROGATE_ARRAY} {x.shape} and "
                f"{target_name} {y.shape} do not match"
            )
        images.append(x)
        targets.append((y > 0).astype(np.uint8))
        index.append(np.full(x.shape[0], k, dtype=np.int32))
    if not images:
        raise InvalidInputError(
            f"site store {site.uri} (site {site.site_id!r}) has no scan with a completed {SURROGATE_STAGE!r} stage "
            f"and {target_name!r}; run the surrogate stage first"
        )
    shapes = {im.shape[1:] for im in images}
    if len(shapes) > 1:
        raise InvalidInputError(f"site {site.site_id!r} mixes slice shapes {sorted(shapes)}")
    return SiteData(
        site_id=site.site_id,
        images=np.concatenate(images),
        targets=np.concatenate(targets),
        scan_index=np.concatenate(index),
    )


def unusable_reason(scan: ScanStore, target_name: str) -> str:
    """Why a scan cannot be trained on (empty when it can): no completed surrogate stage, or no targets."""
    names = set(scan.array_names())
    if not scan.is_done(SURROGATE_STAGE):
        if SURROGATE_ARRAY in names:
            return (
                f"{SURROGATE_ARRAY!r} has no completed {SURROGATE_STAGE!r} stage record "
                "(being written, or its writer stopped half-way)"
            )
        return f"no {SURROGATE_ARRAY!r} yet (the {SURROGATE_STAGE!r} stage has not run)"
    record = scan.stage_record(SURROGATE_STAGE)
    if record is None or SURROGATE_ARRAY not in record.outputs:
        return f"the {SURROGATE_STAGE!r} stage record does not list {SURROGATE_ARRAY!r}"
    if target_name not in names:
        return f"no {target_name!r}"
    return ""


def split_holdout(data: SiteData, *, fraction: float, seed: int) -> tuple[SiteData, SiteData]:
    """(train, holdout). Whole scans go to the holdout when the site has at least two scans (adjacent slices
    of one scan are near-duplicates), else a contiguous block of slices; the choice depends only on
    ``seed`` and the site id."""
    if not 0 < fraction < 1:
        raise InvalidInputError(f"fraction must be in (0, 1), got {fraction}")
    n = data.num_slices
    rng = np.random.default_rng([seed, zlib.crc32(data.site_id.encode())])
    scans = np.unique(data.scan_index)
    if scans.size >= 2:
        n_hold = max(1, round(fraction * scans.size))
        held = rng.choice(scans, size=n_hold, replace=False)
        hold = np.isin(data.scan_index, held)
    else:
        n_hold = max(1, min(n - 1, round(fraction * n)))
        start = int(rng.integers(0, n - n_hold + 1))
        hold = np.zeros(n, dtype=bool)
        hold[start : start + n_hold] = True

    def take(mask: npt.NDArray[np.bool_]) -> SiteData:
        return SiteData(data.site_id, data.images[mask], data.targets[mask], data.scan_index[mask])

    return take(~hold), take(hold)


# ------------------------------------------------------------------------------------------------
# Building site stores with surrogates (tests, benchmarks, demo)
# ------------------------------------------------------------------------------------------------
class StandInSurrogateConfig(StageConfig):
    """Marks surrogates made by :func:`stand_in_surrogate` (until the FESF stage writes real ones)."""

    kind: str = "stand-in: per-site affine intensity map of the HU slice"


def stand_in_surrogate(volume_hu: npt.ArrayLike, *, site_id: str) -> npt.NDArray[np.float32]:
    """A per-site affine intensity map of HU slices into roughly [0, 1] (site-dependent gain and offset),
    used as the surrogate while the FESF stage is not available."""
    h = zlib.crc32(site_id.encode())
    gain = 0.8 + 0.4 * ((h % 1000) / 1000.0)
    offset = -0.1 + 0.2 * (((h // 1000) % 1000) / 1000.0)
    x = (np.asarray(volume_hu, dtype=np.float32) + 1000.0) / 2000.0
    return np.asarray(gain * x + offset, dtype=np.float32)


def write_site_surrogates(
    store_path: str | Path,
    *,
    site_id: str,
    scans: Sequence[tuple[str, npt.ArrayLike, npt.ArrayLike, npt.ArrayLike]],
    pixel_size_mm: float = 1.0,
) -> SiteStore:
    """Create a site store whose scans hold only the surrogate stage's outputs.

    ``scans`` holds ``(scan_id, surrogate (n, H, W), labels (n,), masks (n, H, W))`` per scan;
    ``pixel_size_mm`` is the grid's pixel size recorded in each manifest.
    """
    site = SiteStore.create(store_path, site_id=site_id)
    for scan_id, surrogate, labels, masks in scans:
        s = np.asarray(surrogate, dtype=np.float32)
        lab = np.asarray(labels, dtype=np.uint8)
        m = np.asarray(masks, dtype=np.uint8)
        if s.ndim != 3 or lab.shape != s.shape[:1] or m.shape != s.shape:
            raise InvalidInputError(f"scan {scan_id!r}: shapes {s.shape}, {lab.shape}, {m.shape} do not match")
        grid = ReconGrid(nx_pixels=s.shape[2], ny_pixels=s.shape[1], pixel_size_mm=pixel_size_mm)
        manifest = ScanManifest(scan_id=scan_id, site_id=site_id, data_kind=DataKind.HU_IMAGES, image_grid=grid)
        scan = site.create_scan(manifest)
        scan.run_stage(
            stage=SURROGATE_STAGE,
            config=StandInSurrogateConfig(),
            outputs=[
                StageOutput(SURROGATE_ARRAY, da.from_array(s), ("slice", "y", "x")),
                StageOutput(LABELS_ARRAY, da.from_array(lab), ("slice",)),
                StageOutput(MASKS_ARRAY, da.from_array(m), ("slice", "y", "x")),
            ],
        )
    return site
