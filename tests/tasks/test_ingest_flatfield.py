"""Flat- and dark-field normalisation on ingest: −log((P − D)/(F − D)), streamed, with clamps and dead pixels
counted, and every bad field refused before anything is written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml

from tasks.errors import InvalidInputError
from tasks.flatfield import count_clamped, normalise_block, prepare_gain
from tasks.ingest import ingest
from tasks.storage import SiteStore

GEOMETRY = {"geometry": {"beam": "parallel", "angular_range_deg": 180, "detector_pitch_mm": 1.0}}


@pytest.fixture
def site(tmp_path) -> SiteStore:
    return SiteStore.create(tmp_path / "bench.zarr", site_id="bench")


def bench_scan(rng: np.random.Generator, *, views: int = 70, rows: int = 3, cols: int = 20):
    """Known line integrals, a detector with per-pixel gain and dark current, and its raw images."""
    line = rng.uniform(0.0, 3.0, (views, rows, cols)).astype(np.float32)
    gain = rng.uniform(0.8, 1.2, (rows, cols)) * 1e4
    dark = rng.uniform(90.0, 110.0, (rows, cols))
    flats = gain + dark + rng.normal(0, 1.0, (4, rows, cols))
    darks = dark + rng.normal(0, 1.0, (3, rows, cols))
    raw = dark + gain * np.exp(-line.astype(np.float64))
    return line, raw.astype(np.float32), flats.astype(np.float32), darks.astype(np.float32)


def test_normalising_exact_fields_recovers_the_line_integrals(rng):
    line, raw, flats, darks = bench_scan(rng)
    fields = prepare_gain(
        flats.mean(0, dtype=np.float64), darks.mean(0, dtype=np.float64), shape=(3, 20), n_flats=4, n_darks=3, where="x"
    )
    got, clamped = normalise_block(raw, dark=fields.dark, gain=fields.gain, floor_fraction=1e-5)
    assert clamped == 0
    np.testing.assert_allclose(got, line, atol=5e-3)  # the fields' own noise (σ ≈ 0.5 counts of 1e4)
    # a block at a time gives what the whole stack gives (each view is normalised alone)
    parts = [
        normalise_block(raw[a : a + 7], dark=fields.dark, gain=fields.gain, floor_fraction=1e-5)[0] for a in (0, 7)
    ]
    np.testing.assert_array_equal(np.concatenate(parts), got[:14])


def test_normalising_leaves_its_inputs_alone_and_counts_what_it_clamps(rng):
    _line, raw, flats, darks = bench_scan(rng)
    raw[2, 1, 3] = darks[:, 1, 3].mean() - 5.0  # no signal
    raw[4, 0, 0] = 0.0
    fields = prepare_gain(
        flats.mean(0, dtype=np.float64), darks.mean(0, dtype=np.float64), shape=(3, 20), n_flats=4, n_darks=3, where="x"
    )
    kept = raw.copy(), fields.dark.copy(), fields.gain.copy()
    got, clamped = normalise_block(raw, dark=fields.dark, gain=fields.gain, floor_fraction=1e-5)
    for before, after in zip(kept, (raw, fields.dark, fields.gain), strict=True):
        np.testing.assert_array_equal(before, after)
    assert clamped == 2 == count_clamped(raw, fields, floor_fraction=1e-5)
    assert got[2, 1, 3] == got[4, 0, 0] == pytest.approx(-np.log(1e-5))
    assert got.dtype == np.float32 and np.isfinite(got).all()


def test_a_tiff_stack_with_flats_and_darks_is_normalised_on_ingest(tmp_path, site, rng):
    line, raw, flats, darks = bench_scan(rng)
    raw[5, 1, 4] = darks[:, 1, 4].mean() - 3.0  # below the dark: no signal, clamped and counted
    raw[9, 0, 0] = 0.0
    flats[:, 2, 7] = darks[:, 2, 7].mean()  # a dead pixel: no open-beam signal
    folder = tmp_path / "bench"
    folder.mkdir()
    tifffile.imwrite(folder / "proj.tif", raw, photometric="minisblack")
    tifffile.imwrite(folder / "flats.tif", flats, photometric="minisblack")
    np.save(folder / "darks.npy", darks)
    (folder / "proj.tif.yaml").write_text(yaml.safe_dump({**GEOMETRY, "flats": "flats.tif", "darks": "darks.npy"}))
    res = ingest(folder / "proj.tif", site=site)
    scan = site.scan(res.scan_id)
    m = scan.manifest
    assert m.flat_dark is not None
    assert (m.flat_dark.n_flats, m.flat_dark.n_darks) == (4, 3)
    assert m.flat_dark.clamped_values == 2 and m.flat_dark.dead_pixels == 1
    assert m.i0_photons == pytest.approx(1e4, rel=0.05)  # mean F − D: the open-beam signal
    assert scan.stage_record("ingest").metrics["clamped_values"] == 2
    assert len(m.source_files) == 3  # flats and darks are part of the source (its digest)
    p = scan.array("projections")[...]
    assert p[5, 1, 4] == pytest.approx(-np.log(1e-5))
    live = np.ones_like(p, dtype=bool)
    live[5, 1, 4] = live[9, 0, 0] = False
    live[:, 2, 7] = False
    np.testing.assert_allclose(p[live], line[live], atol=5e-3)
    np.testing.assert_allclose(p[:, 2, 7], 0.5 * (p[:, 2, 6] + p[:, 2, 8]), rtol=1e-5)  # repaired from neighbours


def test_an_npz_with_flats_and_darks_members(tmp_path, site, rng):
    line, raw, flats, darks = bench_scan(rng, views=12)
    src = tmp_path / "bench.npz"
    np.savez(src, projections=raw, flats=flats, darks=darks)
    src.with_name("bench.npz.yaml").write_text(yaml.safe_dump(GEOMETRY))
    scan = site.scan(ingest(src, site=site).scan_id)
    np.testing.assert_allclose(scan.array("projections")[...], line, atol=5e-3)
    assert scan.manifest.flat_dark.n_flats == 4


def _bad(tmp_path: Path, site: SiteStore, rng, *, match: str, flats=None, darks=None, data_kind=None) -> None:
    _line, raw, good_flats, good_darks = bench_scan(rng, views=8)
    folder = tmp_path / f"case{len(list(tmp_path.glob('case*')))}"
    folder.mkdir()
    np.save(folder / "p.npy", raw)
    np.save(folder / "f.npy", good_flats if flats is None else flats)
    np.save(folder / "d.npy", good_darks if darks is None else darks)
    sidecar = {**GEOMETRY, "flats": "f.npy", "darks": "d.npy", **({"data_kind": data_kind} if data_kind else {})}
    (folder / "p.npy.yaml").write_text(yaml.safe_dump(sidecar))
    with pytest.raises(InvalidInputError, match=match) as info:
        ingest(folder / "p.npy", site=site)
    assert len(str(info.value).splitlines()) == 1
    assert site.scan_ids() == []


def test_bad_fields_are_refused_naming_the_file(tmp_path, site, rng):
    _bad(
        tmp_path,
        site,
        rng,
        flats=np.ones((2, 3, 19)),
        match=r"f.npy: flats of shape \(3, 19\), but projections are \(3, 20\)",
    )
    _bad(tmp_path, site, rng, darks=np.ones((4, 20)), match=r"darks of shape \(4, 20\), but projections are \(3, 20\)")
    _bad(tmp_path, site, rng, flats=np.zeros((2, 3, 20)), match=r"f.npy: flats are all zero")
    _bad(tmp_path, site, rng, flats=np.full((2, 3, 20), 50.0), match=r"f.npy: darks are brighter than flats")
    _bad(tmp_path, site, rng, data_kind="counts", match=r"p.npy: flats/darks normalise raw projections")
    flats = np.full((1, 3, 20), 2e4)
    flats[0, 1, :] = 0.0
    _bad(tmp_path, site, rng, flats=flats, match=r"detector row 1 has no live pixel")
    nan = np.full((1, 3, 20), 2e4)
    nan[0, 0, 0] = np.nan
    _bad(tmp_path, site, rng, flats=nan, match=r"f.npy \(flats\): non-finite values")
    folder = tmp_path / "nofile"
    folder.mkdir()
    np.save(folder / "p.npy", bench_scan(rng, views=4)[1])
    (folder / "p.npy.yaml").write_text(yaml.safe_dump({**GEOMETRY, "flats": "missing.tif"}))
    with pytest.raises(InvalidInputError, match=r"missing.tif: no such flats file"):
        ingest(folder / "p.npy", site=site)
