"""Demo site stores: layout, determinism across runs and site counts, idempotent reruns, preview."""

import numpy as np
import pytest
from PIL import Image

from schemas.demo import DemoSize, default_sites
from schemas.manifest import DataKind
from tasks.demo.build import DEMO_STAGE, build_demo_sites
from tasks.errors import InvalidInputError
from tasks.storage import SiteStore

ARGS = {"scans_per_site": 2, "n_slices": 4, "size": DemoSize.TINY}
NAMES = ("projections", "counts", "volume_truth", "labels", "lesion_masks")


def _read(path):
    site = SiteStore.open(path, mode="r")
    return {(s.scan_id, n): s.array(n)[...] for s in site.scans() for n in s.array_names()}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, build_demo_sites(out, n_sites=2, seed=3, keep_counts=True, **ARGS)


def test_one_store_per_site_with_the_documented_layout(built):
    _, paths = built
    assert [p.name for p in paths] == ["A.zarr", "B.zarr"]
    for path, profile in zip(paths, default_sites(2), strict=True):
        site = SiteStore.open(path, mode="r")
        assert site.site_id == profile.site_id
        assert site.scan_ids() == [f"{profile.site_id}-0000", f"{profile.site_id}-0001"]
        for scan in site.scans():
            m = scan.manifest
            g = m.geometry
            assert m.data_kind is DataKind.COUNTS
            assert m.i0_photons == profile.i0_photons
            assert m.labels["source"] == "fedscan-demo"
            assert g == profile.geometry(profile.grid("tiny"), n_slices=4)
            assert sorted(scan.array_names()) == sorted(NAMES)
            proj = scan.array("projections")
            assert proj.shape == (g.n_views, 4, g.n_detector_cols)
            assert proj.metadata.dimension_names == ("view", "row", "col")
            assert scan.array("volume_truth").shape == (4, g.grid.ny_pixels, g.grid.nx_pixels)
            masks = scan.array("lesion_masks")[...]
            np.testing.assert_array_equal(scan.array("labels")[...], masks.reshape(4, -1).max(axis=1))
            assert len(scan.array("lesion_masks").attrs["lesions"]) == m.labels["n_lesions"]
            assert scan.is_done(DEMO_STAGE)
            assert np.isfinite(proj[...]).all()


def test_same_seed_same_bytes_and_sites_do_not_depend_on_the_site_count(built, tmp_path):
    _, paths = built
    again = build_demo_sites(tmp_path / "again", n_sites=1, seed=3, keep_counts=True, **ARGS)
    a, b = _read(paths[0]), _read(again[0])
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].tobytes() == b[key].tobytes(), key
    other = _read(build_demo_sites(tmp_path / "other", n_sites=1, seed=4, keep_counts=True, **ARGS)[0])
    assert other[("A-0000", "projections")].tobytes() != a[("A-0000", "projections")].tobytes()


def test_rerun_skips_finished_scans_and_another_seed_is_refused(built):
    out, paths = built
    site = SiteStore.open(paths[0], mode="r")
    before = {s.scan_id: s.stage_record(DEMO_STAGE).finished_at for s in site.scans()}
    build_demo_sites(out, n_sites=2, seed=3, keep_counts=True, **ARGS)
    after = {s.scan_id: s.stage_record(DEMO_STAGE).finished_at for s in SiteStore.open(paths[0], mode="r").scans()}
    assert after == before
    with pytest.raises(InvalidInputError, match="other source data"):
        build_demo_sites(out, n_sites=1, seed=5, keep_counts=True, **ARGS)


def test_line_integrals_only_and_preview(tmp_path):
    paths = build_demo_sites(tmp_path, n_sites=3, scans_per_site=1, n_slices=3, seed=0, size=32, preview=True)
    for path in paths:
        scan = SiteStore.open(path, mode="r").scans()[0]
        assert scan.manifest.data_kind is DataKind.LINE_INTEGRALS
        assert "counts" not in scan.array_names()
    with Image.open(tmp_path / "preview.png") as im:
        assert im.size == (3 * 256, 2 * 256 + 28)
        pixels = np.asarray(im)
    assert pixels[20:270].std() > 10  # images, not a blank sheet


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(InvalidInputError, match="scans_per_site"):
        build_demo_sites(tmp_path, scans_per_site=0)
    with pytest.raises(InvalidInputError, match="size must be one of"):
        build_demo_sites(tmp_path, size="huge")
    assert not any(tmp_path.iterdir())  # nothing written for refused arguments
