"""DICOM-CT-PD: one file per view with the detector geometry in private tags; what fedscan's geometry cannot
express is refused naming the tag."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tasks.errors import InvalidInputError
from tasks.ingest import ingest, open_source
from tasks.storage import SiteStore
from tests.tasks.ctpd_files import SLOPE, write_ctpd

GEO = {"sid_mm": 500.0, "sdd_mm": 900.0, "pitch_mm": 1.5}


@pytest.fixture
def site(tmp_path) -> SiteStore:
    return SiteStore.create(tmp_path / "ldct.zarr", site_id="ldct")


def test_views_are_read_in_angle_order_with_the_geometry_of_the_tags(tmp_path, site, rng):
    line = rng.uniform(0.0, 6.0, (24, 2, 16))
    files = write_ctpd(tmp_path / "ct", line, start_rad=0.5, **GEO)
    stack = open_source(tmp_path / "ct")
    assert stack.reader == "dicom-ct-pd" and stack.shape == (24, 2, 16)
    assert stack.files == tuple(files)  # angle order, not the (reversed) names
    res = ingest(tmp_path / "ct", site=site)  # no sidecar needed: the files state their geometry
    scan = site.scan(res.scan_id)
    np.testing.assert_allclose(scan.array("projections")[...], line, atol=SLOPE / 2 + 1e-6)
    g = scan.manifest.geometry
    assert (g.beam.value, g.detector_shape.value) == ("fan", "curved")
    assert (g.n_views, g.n_detector_rows, g.n_detector_cols) == (24, 2, 16)
    assert g.source_to_isocenter_mm == 500.0 and g.source_to_detector_mm == 900.0
    assert g.detector_pitch_mm == pytest.approx(1.5) and g.detector_row_pitch_mm == pytest.approx(1.0)
    assert g.angular_range_deg == pytest.approx(360.0) and g.start_angle_deg == pytest.approx(math.degrees(0.5))
    assert g.detector_offset_cols == pytest.approx(0.0)
    assert scan.manifest.data_kind.value == "line_integrals"


def _refused(tmp_path, site, rng, match: str, *, name: str, edit=None, **kw) -> None:
    line = rng.uniform(0.0, 3.0, (12, 1, 8))
    write_ctpd(tmp_path / name, line, edit=edit, **{**GEO, **kw})
    with pytest.raises(InvalidInputError, match=match) as info:
        ingest(tmp_path / name, site=site)
    assert len(str(info.value).splitlines()) == 1
    assert site.scan_ids() == []


def _set(tag, vr, value, *, only=None):
    def edit(k, ds):
        if only is None or k == only:
            ds.add_new(tag, vr, value)

    return edit


def test_what_the_geometry_cannot_express_is_refused_naming_the_tag(tmp_path, site, rng):
    _refused(
        tmp_path,
        site,
        rng,
        r"FlyingFocalSpotMode \(7033,100E\) is FFSXY",
        name="ffs",
        edit=_set((0x7033, 0x100E), "CS", "FFSXY"),
    )
    _refused(
        tmp_path,
        site,
        rng,
        r"SourceAngularPositionShift \(7033,100B\) is not zero",
        name="shift",
        edit=_set((0x7033, 0x100B), "FL", 0.001, only=3),
    )
    helical = lambda k, ds: ds.add_new((0x7031, 0x1002), "FL", 0.5 * k)
    _refused(
        tmp_path,
        site,
        rng,
        r"DetectorFocalCenterAxialPosition \(7031,1002\) changes between views: helical",
        name="helix",
        edit=helical,
    )
    _refused(
        tmp_path, site, rng, r"DetectorShape \(7029,100B\) SPHERICAL is not supported", name="sphere", shape="SPHERICAL"
    )
    _refused(
        tmp_path,
        site,
        rng,
        r"view00006.dcm: ConstantRadialDistance \(7031,1031\) contradicts the other views",
        name="contradict",
        edit=_set((0x7031, 0x1031), "FL", 950.0, only=5),
    )
    _refused(
        tmp_path,
        site,
        rng,
        r"NumberofSourceAngularSteps \(7033,1013\) contradicts the angular step",
        name="steps",
        edit=_set((0x7033, 0x1013), "US", 1000),
    )
    gap = lambda k, ds: ds.add_new((0x7031, 0x1001), "FL", (k + (k >= 6)) * 2 * math.pi / 13)
    _refused(
        tmp_path,
        site,
        rng,
        r"DetectorFocalCenterAngularPosition \(7031,1001\) is not evenly spaced",
        name="gap",
        edit=gap,
    )


def test_identifying_attributes_of_ctpd_views_never_reach_the_store(tmp_path, site, rng):
    from pathlib import Path

    from tests.tasks.test_ingest_dicom import IDENTITY

    def identify(_k, ds):
        for attr, value in IDENTITY.items():
            setattr(ds, attr, value)

    write_ctpd(tmp_path / "id", rng.uniform(0.0, 3.0, (8, 1, 8)), edit=identify, **GEO)
    res = ingest(tmp_path / "id", site=site)
    texts = [p.read_text() for p in Path(site.uri).rglob("zarr.json")]
    assert any(res.scan_id in t for t in texts)
    for text in texts:
        for value in [*IDENTITY.values(), "DOE", "7654321", "Elsewhere"]:
            assert value not in text
