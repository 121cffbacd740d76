from __future__ import annotations

import numpy as np
import pytest
import yaml

from tasks.errors import InvalidInputError
from tasks.watch import ScanWatcher


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def setup(tmp_path):
    site = tmp_path / "site-a"
    site.mkdir()
    got = []
    clock = Clock()
    watcher = ScanWatcher(tmp_path, settle_seconds=2.0, emit=got.append, clock=clock)
    return tmp_path, site, got, clock, watcher


def _poll_after(watcher, clock, seconds):
    clock.t += seconds
    return watcher.poll()


def test_complete_scan_is_announced_once_after_it_settles(setup, rng):
    root, site, got, clock, watcher = setup
    data = rng.random((30, 2, 16)).astype("f4")
    np.save(site / "ct1.npy", data)
    (site / "ct1.npy.yaml").write_text(yaml.safe_dump({"geometry": {"beam": "parallel"}}))
    assert watcher.poll() == []  # first sight
    assert _poll_after(watcher, clock, 1.0) == []  # not settled yet
    (arrival,) = _poll_after(watcher, clock, 1.5)
    assert arrival.site_id == "site-a" and arrival.path == site / "ct1.npy"
    assert got == [arrival]
    assert _poll_after(watcher, clock, 5) == []
    # a restarted watcher remembers what it announced
    again = ScanWatcher(root, settle_seconds=2.0, emit=got.append, clock=clock)
    again.poll()
    assert _poll_after(again, clock, 5) == []
    # new content under the same name is a new scan
    np.save(site / "ct1.npy", data[:20])
    again.poll()
    assert len(_poll_after(again, clock, 3)) == 1


def test_file_still_being_written_is_not_complete(setup, rng):
    _root, site, _got, clock, watcher = setup
    (site / "ct2.npy.yaml").write_text(yaml.safe_dump({"geometry": {"beam": "parallel"}}))
    np.save(site / "full.bin.npy", rng.random((50, 4, 32)).astype("f4"))
    whole = (site / "full.bin.npy").read_bytes()
    (site / "full.bin.npy").unlink()
    target = site / "ct2.npy"
    for cut in (2000, 9000, 20000):  # the writer keeps appending: never settles
        target.write_bytes(whole[:cut])
        assert _poll_after(watcher, clock, 3) == []
    # it stops growing but is truncated: stable, yet not a complete scan
    assert _poll_after(watcher, clock, 3) == []
    assert _poll_after(watcher, clock, 3) == []
    target.write_bytes(whole)
    watcher.poll()
    assert [a.path for a in _poll_after(watcher, clock, 3)] == [target]


def test_scan_without_sidecar_waits(setup, rng):
    _root, site, _got, clock, watcher = setup
    np.save(site / "ct3.npy", rng.random((10, 1, 8)).astype("f4"))
    watcher.poll()
    assert _poll_after(watcher, clock, 5) == []
    (site / "ct3.npy.yaml").write_text(yaml.safe_dump({"geometry": {"beam": "parallel"}}))
    watcher.poll()
    assert len(_poll_after(watcher, clock, 3)) == 1


def test_series_folder_is_one_scan(setup, rng):
    import tifffile

    _root, site, _got, clock, watcher = setup
    folder = site / "series-9"
    folder.mkdir()
    (folder / "fedscan.yaml").write_text(yaml.safe_dump({"geometry": {"beam": "parallel"}}))
    for i in range(5):
        tifffile.imwrite(folder / f"v{i}.tif", rng.random((2, 8)).astype("f4"))
    watcher.poll()
    (arrival,) = _poll_after(watcher, clock, 3)
    assert arrival.path == folder


def test_watching_a_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(InvalidInputError, match="not a folder to watch"):
        ScanWatcher(tmp_path / "nope")
