from __future__ import annotations

import numpy as np
import yaml
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


def test_help_lists_commands():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("ingest", "inspect", "demo"):
        assert cmd in res.output


def test_ingest_then_inspect(tmp_path, rng):
    src = tmp_path / "scan.npy"
    np.save(src, rng.random((24, 2, 16)).astype("f4"))
    (tmp_path / "scan.npy.yaml").write_text(
        yaml.safe_dump({"scan_id": "ct-001", "geometry": {"beam": "parallel", "angular_range_deg": 180}})
    )
    data = tmp_path / "data"
    res = runner.invoke(app, ["ingest", str(src), "--site", "site-a", "--store", str(data)])
    assert res.exit_code == 0, res.output
    assert "ct-001" in res.output
    out = runner.invoke(app, ["inspect", str(data)])
    assert out.exit_code == 0, out.output
    for text in ("site site-a", "scan ct-001", "projections", "view,row,col", "24×2×16", "stage ingest done"):
        assert text in out.output
    # the same as one JSON document, for scripts
    doc = runner.invoke(app, ["inspect", "--json", str(data)])
    assert doc.exit_code == 0, doc.output
    import json

    (site,) = json.loads(doc.stdout)["sites"]
    (scan,) = site["scans"]
    assert site["site_id"] == "site-a" and scan["scan_id"] == "ct-001" and scan["labelled"] is False
    projections = next(a for a in scan["arrays"] if a["name"] == "projections")
    assert projections["shape"] == [24, 2, 16] and projections["dims"] == ["view", "row", "col"]
    assert projections["chunks_written"] == projections["chunks_total"] > 0
    assert scan["stages"]["denoise"] == "pending" and scan["stages"]["reconstruct"] == "pending"
    assert scan["stages"]["diagnose"] == "not-applicable"  # no promoted model
    assert set(scan["provenance"]) == {"ingest"} and scan["geometry"]["beam"] == "parallel"
    # the same source again: a clear line, exit 3, nothing new written; --skip-existing makes it exit 0
    again = runner.invoke(app, ["ingest", str(src), "--site", "site-a", "--store", str(data)])
    assert again.exit_code == 3
    assert "already ingested as scan 'ct-001'" in again.output
    assert (
        runner.invoke(app, ["ingest", str(src), "--site", "site-a", "--store", str(data), "--skip-existing"]).exit_code
        == 0
    )


def test_cli_flags_override_sidecar_geometry(tmp_path, rng):
    src = tmp_path / "fan.npy"
    np.save(src, rng.random((36, 1, 32)).astype("f4"))
    data = tmp_path / "data"
    res = runner.invoke(
        app,
        [
            "ingest",
            str(src),
            "--site",
            "b",
            "--store",
            str(data),
            "--beam",
            "fan",
            "--sid-mm",
            "500",
            "--sdd-mm",
            "900",
            "--detector-pitch-mm",
            "1.2",
        ],
    )
    assert res.exit_code == 0, res.output
    from tasks.storage import SiteStore

    site = SiteStore.open(data / "b.zarr")
    (scan,) = site.scans()
    assert scan.manifest.geometry.magnification == 1.8
    assert scan.manifest.geometry.detector_pitch_mm == 1.2


def test_errors_are_one_line_without_traceback(tmp_path):
    bad = tmp_path / "bad.npy"
    np.save(bad, np.array([[[np.nan, 1.0]]], "f4"))
    res = runner.invoke(app, ["ingest", str(bad), "--site", "a", "--store", str(tmp_path / "d")])
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("fedscan: error:") and "bad.npy" in lines[0]
    assert "Traceback" not in res.output
    debug = runner.invoke(app, ["--debug", "ingest", str(bad), "--site", "a", "--store", str(tmp_path / "d")])
    assert debug.exit_code != 0 and debug.exception is not None
    foreign = tmp_path / "notastore.zarr"
    foreign.mkdir()
    (foreign / "x").write_text("x")
    res = runner.invoke(app, ["inspect", str(foreign)])
    assert res.exit_code == 2 and "not a fedscan site store" in res.output
