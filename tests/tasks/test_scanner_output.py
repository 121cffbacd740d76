from __future__ import annotations

import numpy as np
import pytest

from schemas.geometry import Geometry, ReconGrid
from tasks.ingest import ingest
from tasks.physics import counts_to_line_integrals
from tasks.scanner_output import ScannerFormat, adc_counts, write_scanner_output
from tasks.storage import SiteStore

FAN = Geometry(
    beam="fan",
    detector_shape="curved",
    n_views=24,
    n_detector_cols=20,
    n_detector_rows=2,
    detector_pitch_mm=1.5,
    source_to_isocenter_mm=500,
    source_to_detector_mm=900,
    grid=ReconGrid(nx_pixels=16, ny_pixels=16, pixel_size_mm=1.0),
)


@pytest.mark.parametrize("fmt", list(ScannerFormat))
def test_scanner_output_round_trips_through_ingest(tmp_path, rng, fmt):
    i0 = 3e4
    p = rng.random((24, 2, 20)).astype("f4") * 3
    counts = rng.poisson(i0 * np.exp(-p)).astype("f4")
    path = write_scanner_output(
        tmp_path / "in",
        scan_id="ct-7",
        geometry=FAN,
        line_integrals=p,
        counts=counts,
        i0_photons=i0,
        water_attenuation_per_mm=0.02,
        fmt=fmt,
    )
    site = SiteStore.create(tmp_path / "s.zarr", site_id="s")
    res = ingest(path, site=site)
    scan = site.scan(res.scan_id)
    assert res.scan_id == "ct-7"
    assert scan.manifest.geometry == FAN  # the geometry survives the sidecar exactly
    assert scan.manifest.water_attenuation_per_mm == 0.02
    got = scan.array("projections")[...]
    if fmt is ScannerFormat.TIFF:
        np.testing.assert_array_equal(got, p)
    else:
        assert scan.manifest.i0_photons == i0
        np.testing.assert_array_equal(scan.array("counts")[...], counts.astype("u2"))
        np.testing.assert_allclose(got, counts_to_line_integrals(counts, i0_photons=i0), rtol=1e-6)


def test_adc_counts_never_saturate_at_high_dose():
    counts = np.array([-3.2, 0.4, 70000.0, 1e5])
    assert adc_counts(counts, i0_photons=1e4).dtype == np.uint16
    high = adc_counts(counts, i0_photons=1e5)
    assert high.dtype == np.uint32
    np.testing.assert_array_equal(high, [0, 0, 70000, 100000])
