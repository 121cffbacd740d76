"""Analytic phantoms: rendering and exact line integrals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from schemas.geometry import Geometry, ReconGrid
from tasks import phantoms
from tasks.errors import InvalidInputError

GRID = ReconGrid(nx_pixels=64, ny_pixels=64, pixel_size_mm=0.5)


def test_shepp_logan_brain_is_water_and_orientation_follows_the_grid() -> None:
    image = phantoms.render(phantoms.shepp_logan(15.0), GRID)
    assert image.dtype == np.float32
    assert image.shape == (64, 64)
    assert math.isclose(float(np.median(image[image > 0])), phantoms.WATER_ATTENUATION_PER_MM, rel_tol=1e-6)
    assert math.isclose(float(image.max()), 5 * phantoms.WATER_ATTENUATION_PER_MM, rel_tol=1e-6)
    # The phantom is taller (y, rows) than wide (x, columns).
    rows = np.flatnonzero(image.any(axis=1))
    cols = np.flatnonzero(image.any(axis=0))
    assert rows.size > cols.size


def test_rendered_disk_has_the_right_area_and_centre() -> None:
    ellipses = phantoms.disk(8.0, value_per_mm=1.0, centre_mm=(3.0, -2.0))
    image = phantoms.render(ellipses, GRID, supersample=8)
    assert math.isclose(float(image.sum()) * 0.25, math.pi * 64, rel_tol=0.005)
    yy, xx = np.mgrid[0:64, 0:64]
    assert math.isclose(float((image * (xx - 31.5)).sum() / image.sum()) * 0.5, 3.0, abs_tol=0.01)
    assert math.isclose(float((image * (yy - 31.5)).sum() / image.sum()) * 0.5, -2.0, abs_tol=0.01)


def test_chord_integral_of_a_disk_through_its_centre_is_its_diameter() -> None:
    ellipses = phantoms.disk(5.0, value_per_mm=2.0, centre_mm=(1.0, 1.0))
    value = phantoms.chord_integrals(ellipses, np.array([[1.0, -30.0]]), np.array([[0.0, 3.0]]))
    assert math.isclose(float(value[0]), 20.0, rel_tol=1e-12)
    miss = phantoms.chord_integrals(ellipses, np.array([[7.0, 0.0]]), np.array([[0.0, 1.0]]))
    assert float(miss[0]) == 0.0


def test_closed_form_parallel_sinogram_equals_the_general_ray_integral() -> None:
    g = Geometry(
        beam="parallel", n_views=17, n_detector_cols=50, detector_pitch_mm=0.7, detector_offset_cols=0.4, grid=GRID
    )
    ellipses = phantoms.shepp_logan(14.0)
    np.testing.assert_allclose(
        phantoms.parallel_line_integrals(ellipses, g), phantoms.line_integrals(ellipses, g), rtol=1e-5, atol=1e-6
    )


def test_line_integrals_equal_a_numerical_sum_over_the_rendered_image() -> None:
    # Fan beam, curved detector: integrate the rendered (fine) phantom along each ray numerically.
    fine = ReconGrid(nx_pixels=400, ny_pixels=400, pixel_size_mm=0.08)
    g = Geometry(
        beam="fan",
        detector_shape="curved",
        n_views=5,
        n_detector_cols=9,
        detector_pitch_mm=3.0,
        source_to_isocenter_mm=100.0,
        source_to_detector_mm=200.0,
        grid=fine,
    )
    ellipses = (phantoms.Ellipse(0.02, 10.0, 6.0, 2.0, -1.0, 30.0),)
    exact = phantoms.line_integrals(ellipses, g)
    image = phantoms.render(ellipses, fine)
    theta = np.deg2rad(g.view_angles_deg())
    gamma = np.asarray(g.detector_u_mm()) / 200.0
    t = np.arange(60.0, 140.0, 0.02)
    numeric = np.zeros_like(exact)
    for v, th in enumerate(theta):
        d = np.array([-math.sin(th), math.cos(th)])
        e = np.array([math.cos(th), math.sin(th)])
        for c, ga in enumerate(gamma):
            direction = math.cos(ga) * d + math.sin(ga) * e
            pts = -100.0 * d + t[:, None] * direction
            j = np.round(pts[:, 1] / 0.08 + 199.5).astype(int)
            i = np.round(pts[:, 0] / 0.08 + 199.5).astype(int)
            ok = (i >= 0) & (i < 400) & (j >= 0) & (j < 400)
            numeric[v, c] = image[j[ok], i[ok]].sum() * 0.02
    # Nearest-pixel sampling of 0.08 mm pixels: right to ~1 % overall (grazing rays differ most).
    assert np.linalg.norm(numeric - exact) / np.linalg.norm(exact) < 0.01
    assert np.abs(numeric - exact).max() < 0.01


def test_bad_ellipses_are_refused() -> None:
    with pytest.raises(InvalidInputError, match="semi-axes"):
        phantoms.Ellipse(1.0, 0.0, 1.0)
    with pytest.raises(InvalidInputError, match="radius_mm"):
        phantoms.shepp_logan(-1.0)
    fan = Geometry(
        beam="fan",
        n_views=3,
        n_detector_cols=8,
        detector_pitch_mm=1.0,
        source_to_isocenter_mm=100.0,
        source_to_detector_mm=150.0,
        grid=GRID,
    )
    with pytest.raises(InvalidInputError, match="parallel-beam"):
        phantoms.parallel_line_integrals(phantoms.disk(3.0), fan)
