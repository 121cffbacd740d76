from __future__ import annotations

from pathlib import Path

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


# ---- formats from the readers' registry, lone DICOM files -------------------------------------------------
def _dicom_bytes() -> bytes:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("CT_small.dcm")).read_bytes()


@pytest.mark.parametrize("name", ["slice.dcm", "slice.IMA", "slice.dicom"])
def test_a_lone_dicom_file_is_announced_without_a_sidecar(setup, name):
    _root, site, got, clock, watcher = setup
    whole = _dicom_bytes()
    target = site / name
    target.write_bytes(whole[: len(whole) - 5000])  # cut inside the pixel data: headers read, pixels do not
    watcher.poll()
    assert _poll_after(watcher, clock, 3) == []
    assert _poll_after(watcher, clock, 3) == []
    target.write_bytes(whole)
    watcher.poll()
    (arrival,) = _poll_after(watcher, clock, 3)
    assert arrival.path == target and got == [arrival]


def test_the_watched_suffixes_are_the_readers():
    from tasks.sources import READERS
    from tasks.watch import DATA_SUFFIXES

    assert set(DATA_SUFFIXES) == set(READERS) and {".dcm", ".ima", ".npy", ".tif"} <= set(DATA_SUFFIXES)


def test_events_do_not_carry_the_file_name(setup, rng, monkeypatch):
    import prefect.events

    from tasks.watch import emit_prefect_event

    _root, site, _got, clock, watcher = setup
    src = site / "DOE_JANE_19700101.npy"
    np.save(src, rng.random((6, 1, 4)).astype("f4"))
    (site / "DOE_JANE_19700101.npy.yaml").write_text(yaml.safe_dump({"geometry": {"beam": "parallel"}}))
    watcher.poll()
    (arrival,) = _poll_after(watcher, clock, 3)
    sent = []
    monkeypatch.setattr(prefect.events, "emit_event", lambda **kw: sent.append(kw))
    emit_prefect_event(arrival)
    (event,) = sent
    for value in event["resource"].values():
        assert "DOE" not in value and "19700101" not in value
    assert event["resource"]["prefect.resource.id"] == f"fedscan.scan.site-a.{arrival.resource_key}"


def test_site_folders_that_are_not_site_ids_are_skipped(tmp_path, rng):
    bad = tmp_path / "Site A"
    bad.mkdir()
    np.save(bad / "ct.npy", rng.random((6, 1, 4)).astype("f4"))
    (bad / "ct.npy.yaml").write_text(yaml.safe_dump({"geometry": {"beam": "parallel"}}))
    watcher = ScanWatcher(tmp_path, settle_seconds=0, emit=lambda a: None)
    assert watcher.candidates() == []
    with pytest.raises(InvalidInputError, match="site id is not a safe id"):
        ScanWatcher(tmp_path, site_id="../x")


# ---- event payloads -------------------------------------------------------------------------------------
def test_arrival_payloads_inside_the_incoming_folder_pass(tmp_path):
    from tasks.watch import check_arrival

    incoming = tmp_path / "incoming"
    (incoming / "site-a").mkdir(parents=True)
    scan = incoming / "site-a" / "ct.npy"
    assert check_arrival(str(scan), "site-a", incoming=incoming, data_root=tmp_path / "data") == scan.resolve()


@pytest.mark.parametrize(
    ("make_path", "site_id", "match"),
    [
        (lambda t, inc: t / "elsewhere" / "DOE_JANE.npy", "site-a", "outside the incoming folder"),
        (lambda t, inc: inc / ".." / "DOE_JANE.npy", "site-a", "outside the incoming folder"),
        (lambda t, inc: inc / "link" / "DOE_JANE.npy", "site-a", "outside the incoming folder"),  # symlink out
        (lambda t, inc: inc, "site-a", "outside the incoming folder"),
        (lambda t, inc: Path("incoming/DOE_JANE.npy"), "site-a", "not absolute"),
        (lambda t, inc: inc / "s.zarr" / "scans" / "DOE_JANE", "site-a", "inside a site store"),
        (lambda t, inc: inc / "site-a" / "DOE_JANE.npy", "../../escaped", "site id is not a safe id"),
    ],
)
def test_arrival_payloads_outside_are_refused_without_naming_the_path(tmp_path, make_path, site_id, match):
    from tasks.watch import check_arrival

    incoming = tmp_path / "incoming"
    incoming.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (incoming / "link").symlink_to(tmp_path / "elsewhere")
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(InvalidInputError, match=match) as info:
        check_arrival(str(make_path(tmp_path, incoming)), site_id, incoming=incoming, data_root=tmp_path / "data")
    assert "DOE_JANE" not in str(info.value)
    assert sorted(tmp_path.rglob("*")) == before  # nothing created


def test_arrival_payloads_need_a_configured_incoming_folder_and_stay_out_of_the_data_root(tmp_path):
    from tasks.watch import check_arrival

    with pytest.raises(InvalidInputError, match="FEDSCAN_INCOMING"):
        check_arrival(str(tmp_path / "x.npy"), "a", incoming=None, data_root=tmp_path)
    data = tmp_path / "data"
    with pytest.raises(InvalidInputError, match="inside the data root"):
        check_arrival(str(data / "a" / "x.npy"), "a", incoming=tmp_path, data_root=data)
    # an incoming folder inside the data root is allowed (the data root then holds both)
    assert check_arrival(str(data / "in" / "x.npy"), "a", incoming=data / "in", data_root=data).name == "x.npy"
