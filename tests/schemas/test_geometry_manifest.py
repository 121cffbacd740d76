from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from schemas.base import StageConfig
from schemas.geometry import Geometry, ReconGrid
from schemas.manifest import DataKind, ProvenanceRecord, ScanManifest
from schemas.settings import FedscanSettings, get_settings

GRID = ReconGrid(nx_pixels=64, ny_pixels=64, pixel_size_mm=1.0)


def fan(**kw):
    base = dict(
        beam="fan",
        n_views=360,
        n_detector_cols=128,
        detector_pitch_mm=1.0,
        source_to_isocenter_mm=500.0,
        source_to_detector_mm=900.0,
        grid=GRID,
    )
    base.update(kw)
    return Geometry(**base)


def test_parallel_geometry_derived_quantities():
    g = Geometry(
        beam="parallel", n_views=180, angular_range_deg=180, n_detector_cols=100, detector_pitch_mm=0.5, grid=GRID
    )
    assert g.magnification == 1.0
    assert g.view_step_deg == pytest.approx(1.0)
    assert not g.is_full_circle
    u = g.detector_u_mm()
    assert u[0] == pytest.approx(-u[-1])
    assert g.covered_radius_mm == pytest.approx(25.0)
    # a 64 mm grid is not covered by a 50 mm detector: 32 - 25 = 7 mm short
    assert g.fov_shortfall_mm() == pytest.approx(7.0)


def test_fan_geometry_magnification_and_fan_angle():
    g = fan()
    assert g.magnification == pytest.approx(1.8)
    assert g.is_full_circle
    assert g.half_fan_angle_rad == pytest.approx(math.atan(64 / 900))
    curved = fan(detector_shape="curved")
    assert curved.half_fan_angle_rad == pytest.approx(64 / 900)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"source_to_detector_mm": 400.0}, "must exceed"),
        ({"source_to_isocenter_mm": None}, "needs source_to_isocenter_mm"),
        ({"n_views": 0}, "greater than 0"),
        ({"n_detector_cols": -3}, "greater than 0"),
        ({"detector_pitch_mm": 0.0}, "greater than 0"),
        ({"angular_range_deg": 400.0}, "less than or equal to 360"),
        ({"detector_pitch_mm": float("nan")}, "finite"),
        ({"source_to_isocenter_mm": 40.0, "source_to_detector_mm": 80.0}, "reaches the source orbit"),
        ({"detector_shape": "curved", "detector_pitch_mm": 25.0}, "fan of"),
    ],
)
def test_fan_geometry_refuses_impossible_values(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        fan(**kwargs)


def test_parallel_geometry_refuses_distances_and_curved_detector():
    with pytest.raises(ValidationError, match="no source distances"):
        Geometry(
            beam="parallel", n_views=10, n_detector_cols=10, detector_pitch_mm=1, source_to_isocenter_mm=100, grid=GRID
        )
    with pytest.raises(ValidationError, match="curved detector needs a fan"):
        Geometry(
            beam="parallel", detector_shape="curved", n_views=10, n_detector_cols=10, detector_pitch_mm=1, grid=GRID
        )


def test_geometry_is_frozen_and_forbids_extra_fields():
    g = fan()
    with pytest.raises(ValidationError):
        g.n_views = 3  # type: ignore[misc]
    with pytest.raises(ValidationError, match="Extra inputs"):
        Geometry(**{**g.model_dump(), "patient": "x"})
    assert Geometry.model_validate_json(g.model_dump_json()) == g


def test_manifest_refuses_patient_identifiers_and_needs_i0_for_counts():
    g = fan()
    with pytest.raises(ValidationError, match="identify a patient"):
        ScanManifest(
            scan_id="s1", site_id="a", data_kind="line_integrals", geometry=g, labels={"PatientName": "Doe^John"}
        )
    with pytest.raises(ValidationError, match="needs i0_photons"):
        ScanManifest(scan_id="s1", site_id="a", data_kind="counts", geometry=g)
    with pytest.raises(ValidationError, match="needs a geometry"):
        ScanManifest(scan_id="s1", site_id="a", data_kind="line_integrals")
    with pytest.raises(ValidationError, match="pattern"):
        ScanManifest(scan_id="../etc", site_id="a", data_kind="line_integrals", geometry=g)
    m = ScanManifest(
        scan_id="s1",
        site_id="a",
        data_kind=DataKind.COUNTS,
        geometry=g,
        i0_photons=1e4,
        labels={"lesion_prevalence": 0.3},
    )
    assert m.grid == GRID
    assert ScanManifest.model_validate(m.model_dump(mode="json")) == m


class _Cfg(StageConfig):
    threshold: float = 1.0
    mode: str = "a"


def test_config_hash_is_stable_and_sensitive():
    a, b = _Cfg(), _Cfg(threshold=1.0, mode="a")
    assert a.config_hash() == b.config_hash()
    assert len(a.config_hash()) == 16
    assert _Cfg(threshold=1.5).config_hash() != a.config_hash()


def test_provenance_record_roundtrip():
    from datetime import UTC, datetime, timedelta

    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    rec = ProvenanceRecord(
        stage="denoise",
        config={"t": 8},
        config_hash="0" * 16,
        code_version="0.1",
        started_at=t0,
        finished_at=t0 + timedelta(seconds=2.5),
        metrics={"sigma": 0.1},
    )
    assert rec.seconds == pytest.approx(2.5)
    assert ProvenanceRecord.model_validate_json(rec.model_dump_json()) == rec


def test_settings_read_nested_env_lazily(monkeypatch):
    monkeypatch.setenv("FEDSCAN_DATA_ROOT", "s3://bucket/fedscan")
    monkeypatch.setenv("FEDSCAN_DASK__ADDRESS", "tcp://127.0.0.1:8786")
    monkeypatch.setenv("FEDSCAN_DEVICE", "cpu")
    monkeypatch.setenv("FEDSCAN_PREFECT__API_KEY", "secret-value")
    s = FedscanSettings()
    assert s.data_root == "s3://bucket/fedscan"
    assert s.dask.address == "tcp://127.0.0.1:8786"
    assert s.device.value == "cpu"
    assert "secret-value" not in repr(s)
    get_settings.cache_clear()
    try:
        assert get_settings().dask.address == "tcp://127.0.0.1:8786"
    finally:
        get_settings.cache_clear()
    monkeypatch.setenv("FEDSCAN_DEVICE", "tpu")
    with pytest.raises(ValidationError):
        FedscanSettings()
