"""Real scans end to end with `fedscan`: a DICOM CT series from real (JPEG 2000) slices is ingested, labelled and
turned into surrogates by `fedscan run`, which then trains one federated round on them (Flower's Simulation
Engine); a bench flat/dark TIFF stack and a DICOM-CT-PD scan written from the demo anatomy go through denoise →
reconstruct → surrogate, and each reconstruction matches the one from the known line integrals."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml
from typer.testing import CliRunner

from flows.cli import app
from schemas.demo import AnatomyKind
from schemas.geometry import Geometry, ReconGrid
from schemas.manifest import WATER_ATTENUATION_PER_MM
from tasks.storage import SiteStore
from tests.tasks.test_ingest_dicom import write_series

ROOT = Path(__file__).resolve().parents[2]
I0 = 2e4
N_VIEWS, N_COLS, N_SLICES = 180, 64, 2
#: One small round: the clinic's two DICOM series (6 slices of 512²), a 4-channel network.
FEDERATION = {
    "num_rounds": 1,
    "local_epochs": 1,
    "batch_size": 4,
    "base_channels": 4,
    "min_available_clients": 1,
    "round_timeout_s": 300,
    "wait_for_nodes_s": 120,
}


@pytest.fixture
def cpu_device(monkeypatch):
    from schemas.settings import get_settings

    monkeypatch.setenv("FEDSCAN_DEVICE", "cpu")
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def _ok(args: list[str]) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output


def bench_line_integrals() -> tuple[np.ndarray, Geometry]:
    """Known line integrals ``(views, rows, cols)`` of two 64² slices of the demo's abdomen anatomy."""
    from skimage.transform import resize

    from tasks.demo.anatomy import load_template
    from tasks.demo.generate import fedscan_projector

    hu = load_template(AnatomyKind.ABDOMEN).hu
    small = resize(hu, (N_COLS, N_COLS), order=1, anti_aliasing=True).astype(np.float32)
    mu = np.clip(WATER_ATTENUATION_PER_MM * (1.0 + small / 1000.0), 0.0, None)
    images = np.stack([mu, mu[:, ::-1]]).astype(np.float32)  # two slices
    geometry = Geometry(
        beam="parallel",
        n_views=N_VIEWS,
        angular_range_deg=180.0,
        n_detector_cols=N_COLS,
        n_detector_rows=N_SLICES,
        detector_pitch_mm=4.0,  # 4 mm pixels: a 256 mm field of view, so the line integrals are body-sized
        grid=ReconGrid(nx_pixels=N_COLS, ny_pixels=N_COLS, pixel_size_mm=4.0),
    )
    sino = fedscan_projector(images, geometry)  # (slices, views, cols)
    return np.ascontiguousarray(sino.transpose(1, 0, 2)), geometry


def ctpd_line_integrals() -> tuple[np.ndarray, Geometry]:
    """Known fan-beam line integrals of the same anatomy on a curved detector, as a DICOM-CT-PD scan holds them."""
    from skimage.transform import resize

    from tasks.demo.anatomy import load_template
    from tasks.demo.generate import fedscan_projector

    hu = load_template(AnatomyKind.HEAD).hu
    small = resize(hu, (N_COLS, N_COLS), order=1, anti_aliasing=True).astype(np.float32)
    mu = np.clip(WATER_ATTENUATION_PER_MM * (1.0 + small / 1000.0), 0.0, None)[None]
    geometry = Geometry(
        beam="fan",
        detector_shape="curved",
        n_views=N_VIEWS,
        angular_range_deg=360.0,
        n_detector_cols=96,
        n_detector_rows=1,
        detector_pitch_mm=8.0,
        source_to_isocenter_mm=500.0,
        source_to_detector_mm=900.0,
        grid=ReconGrid(nx_pixels=N_COLS, ny_pixels=N_COLS, pixel_size_mm=4.0),
    )
    sino = fedscan_projector(mu.astype(np.float32), geometry)
    return np.ascontiguousarray(sino.transpose(1, 0, 2)), geometry


def psnr(test: np.ndarray, reference: np.ndarray) -> float:
    span = float(reference.max() - reference.min())
    mse = float(np.mean((test.astype(np.float64) - reference) ** 2))
    return 10.0 * np.log10(span**2 / mse)


@pytest.mark.slow
def test_real_scans_through_fedscan(tmp_path, prefect_harness, cpu_device, rng) -> None:
    data = tmp_path / "stores"
    incoming = tmp_path / "incoming"
    # ---- site "clinic": two real DICOM series (JPEG 2000 slices from pydicom-data), labelled two ways ----
    write_series(incoming / "abdomen", "explicit_VR-UN.dcm", 3, step_mm=2.5, order=[1, 2, 0])
    (incoming / "abdomen" / "labels.csv").write_text("scan_id,slice,label\n,0,0\n,1,1\n,2,1\n")
    write_series(incoming / "head", "J2K_pixelrep_mismatch.dcm", 3, step_mm=5.0)
    _ok(["ingest", str(incoming / "abdomen"), "--site", "clinic", "--store", str(data)])
    _ok(["ingest", str(incoming / "head"), "--site", "clinic", "--store", str(data)])
    clinic = SiteStore.open(data / "clinic.zarr")
    head = next(s.scan_id for s in clinic.scans() if "labels" not in s.array_names())
    labels = tmp_path / "clinic-labels.csv"
    labels.write_text("scan_id,slice,label\n" + "".join(f"{head},{k},{int(k == 0)}\n" for k in range(3)))
    _ok(["label", str(data / "clinic.zarr"), str(labels)])
    assert _ok(["inspect", str(data / "clinic.zarr")]).count("; labelled") == 2

    # ---- site "bench": raw images with flats and darks (TIFF), and the same scan as known line integrals ----
    line, _geometry = bench_line_integrals()
    gain = rng.uniform(0.9, 1.1, (N_SLICES, N_COLS))  # per-pixel detector gain
    dark = 100.0 + rng.uniform(-5.0, 5.0, (N_SLICES, N_COLS))
    raw = rng.poisson(I0 * gain * np.exp(-line)) + rng.normal(dark, 2.0, line.shape)
    flats = rng.poisson(I0 * gain, (8, N_SLICES, N_COLS)) + rng.normal(dark, 2.0, (8, N_SLICES, N_COLS))
    darks = rng.normal(dark, 2.0, (8, N_SLICES, N_COLS))
    bench = incoming / "bench"
    bench.mkdir()
    for name, arr in (("proj.tif", raw), ("flats.tif", flats), ("darks.tif", darks)):
        tifffile.imwrite(bench / name, arr.astype(np.float32), photometric="minisblack")
    spec = {
        "geometry": {
            "beam": "parallel",
            "angular_range_deg": 180.0,
            "detector_pitch_mm": 4.0,
            "grid": {"nx_pixels": N_COLS, "ny_pixels": N_COLS, "pixel_size_mm": 4.0},
        }
    }
    (bench / "proj.tif.yaml").write_text(
        yaml.safe_dump({**spec, "flats": "flats.tif", "darks": "darks.tif", "scan_id": "flatdark"})
    )
    np.save(bench / "truth.npy", line.astype(np.float32))
    (bench / "truth.npy.yaml").write_text(yaml.safe_dump({**spec, "i0_photons": I0, "scan_id": "known"}))
    _ok(["ingest", str(bench / "proj.tif"), "--site", "bench", "--store", str(data)])
    _ok(["ingest", str(bench / "truth.npy"), "--site", "bench", "--store", str(data)])

    # ---- site "ldct": a DICOM-CT-PD scan (one file per view) and its known line integrals ----
    from tests.tasks.ctpd_files import write_ctpd

    fan_line, _fan = ctpd_line_integrals()
    grid = {"nx_pixels": N_COLS, "ny_pixels": N_COLS, "pixel_size_mm": 4.0}
    write_ctpd(incoming / "ctpd", fan_line, sid_mm=500.0, sdd_mm=900.0, pitch_mm=8.0)
    (incoming / "ctpd" / "fedscan.yaml").write_text(
        yaml.safe_dump({"scan_id": "ctpd", "i0_photons": I0, "geometry": {"grid": grid}})
    )
    np.save(incoming / "fan.npy", fan_line.astype(np.float32))
    fan_spec = {
        "beam": "fan",
        "detector_shape": "curved",
        "detector_pitch_mm": 8.0,
        "source_to_isocenter_mm": 500.0,
        "source_to_detector_mm": 900.0,
        "grid": grid,
    }
    (incoming / "fan.npy.yaml").write_text(
        yaml.safe_dump({"scan_id": "fan-known", "i0_photons": I0, "geometry": fan_spec})
    )
    _ok(["ingest", str(incoming / "ctpd"), "--site", "ldct", "--store", str(data)])
    _ok(["ingest", str(incoming / "fan.npy"), "--site", "ldct", "--store", str(data)])

    # ---- the nightly chain, here ----
    # ---- the nightly chain, here, then one federated round (Flower's Simulation Engine through `flwr run`) ----
    config = tmp_path / "pipeline.yaml"
    pipeline = yaml.safe_load((ROOT / "configs" / "pipeline.yaml").read_text())
    pipeline["federation"] = FEDERATION
    config.write_text(yaml.safe_dump(pipeline))
    started = time.perf_counter()
    out = " ".join(_ok(["run", "--config", str(config), "--no-report", str(data)]).split())
    print(f"fedscan run (every stage of 6 scans, then one federated round): {time.perf_counter() - started:.1f} s")
    clinic = SiteStore.open(data / "clinic.zarr", mode="r")
    for scan in clinic.scans():
        assert (
            f"clinic/{scan.scan_id}: ok (denoise not-applicable, reconstruct not-applicable, enhance disabled, "
            "surrogate done, diagnose done)" in out  # diagnosed after the round promoted a model of its size
        )
        assert set(scan.provenance()) == {"ingest", "labels", "surrogate", "diagnose"}
        assert scan.array("surrogate").shape == (3, 512, 512)
        assert scan.manifest.data_kind.value == "hu_images"
    assert (
        "bench/flatdark: ok (denoise done, reconstruct done, enhance disabled, surrogate done, diagnose not-applicable)"
        in out
    )
    site = SiteStore.open(data / "bench.zarr", mode="r")
    fd = site.scan("flatdark")
    assert fd.manifest.flat_dark is not None and fd.manifest.flat_dark.n_flats == 8
    volume = np.asarray(fd.array("volume")[...])
    reference = np.asarray(site.scan("known").array("volume")[...])
    value = psnr(volume, reference)
    print(f"flat/dark reconstruction vs known-line-integral reconstruction: PSNR {value:.1f} dB")
    assert value > 40.0  # 49.3 dB measured (seeded), I0 = 2e4 photons with Poisson noise against noise-free truth

    assert (
        "ldct/ctpd: ok (denoise done, reconstruct done, enhance disabled, surrogate done, diagnose not-applicable)"
        in out
    )
    ldct = SiteStore.open(data / "ldct.zarr", mode="r")
    read, known = (ldct.scan(s).manifest.geometry.model_dump() for s in ("ctpd", "fan-known"))
    assert read.pop("detector_row_pitch_mm") == pytest.approx(known.pop("detector_row_pitch_mm"), rel=1e-6)  # FL tag
    assert read == known
    value = psnr(
        np.asarray(ldct.scan("ctpd").array("volume")[...]), np.asarray(ldct.scan("fan-known").array("volume")[...])
    )
    print(f"DICOM-CT-PD reconstruction vs known-line-integral reconstruction: PSNR {value:.1f} dB")
    assert value > 40.0  # 104.1 dB measured: only the 2e-4 quantisation of the stored views differs

    # only the clinic has labelled scans: it alone trained, on the surrogates and labels of its DICOM series
    from tasks.pipeline_support import federated_sites

    assert [Path(u).name for u in federated_sites(str(data))] == ["clinic.zarr"]
    assert "federated: finished:completed, 1 rounds aggregated" in out
    (metrics,) = (data / "models" / "runs").glob("*/metrics.jsonl")
    rounds = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    assert [(r["round"], r["replies_ok"], r["replies_failed"], r["aggregated"]) for r in rounds] == [(1, 1, 0, True)]
    print(f"federated round: {rounds[0]['seconds']:.1f} s")
