"""A missing optional extra is one line naming the extra, from the helper and from the CLI."""

from __future__ import annotations

import importlib
import subprocess
import sys

import numpy as np
import pytest

from tasks.errors import FedscanError
from tasks.extras import MissingExtraError, require_store_protocol

# s3fs is installed in the dev environment; a None entry in sys.modules makes its import fail as if it were not
HIDE_S3FS = "import sys; sys.modules['s3fs'] = None; "


@pytest.fixture
def no_s3fs(monkeypatch):
    monkeypatch.setitem(sys.modules, "s3fs", None)
    monkeypatch.delitem(importlib.import_module("fsspec.registry")._registry, "s3", raising=False)  # not yet loaded


def test_missing_s3fs_names_the_extra(no_s3fs):
    with pytest.raises(MissingExtraError) as info:
        require_store_protocol("s3://bucket/fedscan/site-a.zarr")
    msg = str(info.value)
    assert "fedscan[s3]" in msg and "s3://bucket/fedscan/site-a.zarr" in msg and "\n" not in msg
    assert isinstance(info.value, FedscanError) and isinstance(info.value, ImportError)


def test_local_paths_and_installed_protocols_pass(no_s3fs, tmp_path):
    require_store_protocol(tmp_path / "site-a.zarr")
    require_store_protocol(str(tmp_path / "site-a.zarr"))
    require_store_protocol("memory://site-a.zarr")
    require_store_protocol("file:///tmp/site-a.zarr")


def test_cli_store_s3_without_the_extra_is_one_line(tmp_path):
    scan = tmp_path / "scan.npy"
    np.save(scan, np.ones((8, 2, 16), np.float32))
    (tmp_path / "scan.npy.yaml").write_text(
        "data_kind: line_integrals\ngeometry: {beam: parallel, angular_range_deg: 180, detector_pitch_mm: 1.0}\n"
    )
    code = HIDE_S3FS + "from flows.cli import app; app()"
    args = ["ingest", str(scan), "--site", "site-a", "--store", "s3://bucket/fedscan"]
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "fedscan[s3]" in lines[0] and "Traceback" not in out.stderr, out.stderr
