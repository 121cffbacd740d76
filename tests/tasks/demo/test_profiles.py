"""Site profiles: the heterogeneity the issue asks for, scaling with size, validation."""

import math

import pydantic
import pytest

from schemas.demo import AnatomyKind, DemoSize, SiteProfile, default_sites
from schemas.geometry import BeamKind, DetectorShape


def test_the_three_sites_differ_as_stated():
    a, b, c = default_sites(3)
    assert [s.site_id for s in (a, b, c)] == ["A", "B", "C"]
    ga, gb, gc = (s.geometry(s.grid(DemoSize.FULL), n_slices=4) for s in (a, b, c))
    assert (ga.beam, ga.n_views) == (BeamKind.PARALLEL, 720)
    assert (gb.beam, gb.detector_shape, gb.n_views) == (BeamKind.FAN, DetectorShape.CURVED, 360)
    assert (gc.beam, gc.detector_shape, gc.n_views) == (BeamKind.FAN, DetectorShape.FLAT, 1440)
    # Dose: A high, B medium, C the lowest per view (many views, few photons each).
    assert a.i0_photons > b.i0_photons > c.i0_photons
    assert a.i0_photons * ga.n_views > b.i0_photons * gb.n_views
    # Lesions differ in prevalence and contrast (sign and size).
    assert len({a.lesion_prevalence_fraction, b.lesion_prevalence_fraction, c.lesion_prevalence_fraction}) == 3
    assert a.lesion_contrast_hu[1] < 0 < b.lesion_contrast_hu[0]
    assert abs(c.lesion_contrast_hu[0]) < abs(a.lesion_contrast_hu[0])
    assert all(10 <= abs(v) <= 100 for s in (a, b, c) for v in s.lesion_contrast_hu)  # tens of HU


@pytest.mark.parametrize("size", list(DemoSize))
def test_geometry_scales_with_size_and_covers_the_grid(size):
    for site in default_sites(3):
        grid = site.grid(size)
        g = site.geometry(grid, n_slices=3)
        assert grid.nx_pixels == size.pixels
        assert grid.nx_pixels * grid.pixel_size_mm == pytest.approx(site.display_fov_mm)
        assert g.n_detector_rows == 3
        assert g.detector_row_pitch_mm == site.slice_thickness_mm
        assert g.covered_radius_mm >= grid.fov_radius_mm  # every view sees the whole grid
        expected = max(16, round(site.n_views_at_full_size * size.pixels / 512))
        assert abs(g.n_views - expected) <= 1
        assert g.n_views % 2 == 0
        # Columns sample the isocentre at the requested pitch.
        pitch_iso = g.detector_pitch_mm / g.magnification
        if g.detector_shape is DetectorShape.CURVED:
            assert g.source_to_isocenter_mm is not None
            pitch_iso = g.detector_pitch_mm / g.source_to_detector_mm * g.source_to_isocenter_mm
        assert pitch_iso == pytest.approx(grid.pixel_size_mm / site.detector_cols_per_pixel)


def test_more_sites_cycle_variations_with_unique_ids():
    sites = default_sites(8)
    ids = [s.site_id for s in sites]
    assert ids == ["A", "B", "C", "D", "E", "F", "G", "H"]
    a, d, g = sites[0], sites[3], sites[6]
    assert d.beam is a.beam
    assert d.i0_photons == pytest.approx(a.i0_photons / 2)
    assert g.i0_photons == pytest.approx(a.i0_photons / 4)
    assert d.start_angle_deg != a.start_angle_deg
    assert d.lesion_prevalence_fraction > a.lesion_prevalence_fraction
    assert default_sites(3) == sites[:3]


def test_profiles_are_frozen_and_strict():
    a = default_sites(1)[0]
    with pytest.raises(pydantic.ValidationError):
        a.i0_photons = 1.0  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError, match="extra"):
        SiteProfile.model_validate({**a.model_dump(), "dose": 3})
    with pytest.raises(pydantic.ValidationError, match="low <= high"):
        SiteProfile.model_validate({**a.model_dump(), "lesion_contrast_hu": (10.0, -10.0)})
    with pytest.raises(pydantic.ValidationError, match="fan-beam site needs"):
        SiteProfile.model_validate({**a.model_dump(), "beam": "fan"})
    with pytest.raises(pydantic.ValidationError, match="curved detector"):
        SiteProfile.model_validate({**a.model_dump(), "detector_shape": "curved"})
    round_trip = SiteProfile.model_validate_json(a.model_dump_json())
    assert round_trip == a
    assert round_trip.anatomy == (AnatomyKind.ABDOMEN,)


def test_bad_sizes_are_refused():
    a = default_sites(1)[0]
    with pytest.raises(ValueError, match="size"):
        a.grid(4)
    with pytest.raises(ValueError, match="n_slices"):
        a.geometry(a.grid(32), n_slices=0)
    with pytest.raises(ValueError, match="n must be"):
        default_sites(0)
    assert math.isclose(a.grid(64).pixel_size_mm, a.display_fov_mm / 64)
