"""What a ClientApp trains on: only surrogates whose stage record is complete."""

from __future__ import annotations

import logging

import dask.array as da
import numpy as np
import pytest

from tasks.errors import InvalidInputError
from tasks.federated.data import (
    LABELS_ARRAY,
    MASKS_ARRAY,
    SURROGATE_ARRAY,
    SURROGATE_STAGE,
    StandInSurrogateConfig,
    load_site_data,
)
from tasks.storage import SiteStore, StageOutput

from .conftest import make_site


class _Rewrite(StandInSurrogateConfig):
    """Another surrogate config, so that the stage is recomputed."""

    kind: str = "a second surrogate run"


def _fail_after_first_chunk(block: np.ndarray, block_info: dict | None = None) -> np.ndarray:
    if block_info is not None and block_info[0]["chunk-location"][0] >= 1:
        raise OSError("writer killed")
    return block


def _half_write_surrogate(store, scan_id: str) -> None:
    """Rewrite one scan's surrogate under a new config and die after its first chunk (as a killed writer)."""
    scan = next(s for s in SiteStore.open(store, mode="r+").scans() if s.scan_id == scan_id)
    x = np.asarray(scan.array(SURROGATE_ARRAY)[...])
    dying = da.from_array(x, chunks=(2, *x.shape[1:])).map_blocks(_fail_after_first_chunk, dtype=x.dtype)
    with pytest.raises(OSError, match="writer killed"):
        scan.run_stage(
            stage=SURROGATE_STAGE,
            config=_Rewrite(),
            outputs=[StageOutput(SURROGATE_ARRAY, dying, ("slice", "y", "x"), chunks=(2, *x.shape[1:]))],
        )
    assert SURROGATE_ARRAY in scan.array_names() and scan.stage_record(SURROGATE_STAGE) is None


def test_a_half_written_surrogate_is_skipped_with_a_logged_reason(tmp_path, caplog):
    store = make_site(tmp_path / "A.zarr", "A", 0, n_scans=3, n_slices=6)
    whole = load_site_data(store, task="classify")
    _half_write_surrogate(store, "scan-1")
    caplog.set_level(logging.WARNING, logger="fedscan.federated.data")
    data = load_site_data(store, task="classify")
    assert data.num_slices == whole.num_slices - 6  # scan-1's 6 slices are not read
    assert set(np.unique(data.scan_index)) == {0, 2}
    (msg,) = [r.getMessage() for r in caplog.records]
    assert "scan-1" in msg and "no completed 'surrogate' stage record" in msg
    # the same for segmentation: the masks are there, the surrogate is not complete
    assert load_site_data(store, task="segment").num_slices == whole.num_slices - 6


def test_a_site_whose_only_surrogate_is_half_written_has_nothing_to_train_on(tmp_path):
    store = make_site(tmp_path / "B.zarr", "B", 1, n_scans=1, n_slices=6)
    _half_write_surrogate(store, "scan-0")
    with pytest.raises(InvalidInputError, match="no scan with a completed 'surrogate' stage"):
        load_site_data(store, task="classify")


def test_complete_scans_are_read_whole(tmp_path):
    store = make_site(tmp_path / "C.zarr", "C", 2, n_scans=2, n_slices=5)
    data = load_site_data(store, task="segment")
    site = SiteStore.open(store, mode="r")
    assert all(s.is_done(SURROGATE_STAGE) for s in site.scans())
    assert data.images.shape == (10, 32, 32) and data.targets.shape == (10, 32, 32)
    assert {LABELS_ARRAY, MASKS_ARRAY} <= set(site.scans()[0].array_names())
