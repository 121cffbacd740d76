"""Unsafe ids and event payloads are refused before anything is created; the CLI lists the readers' formats."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app
from tasks.errors import InvalidInputError
from tasks.sources import accepted_suffixes

runner = CliRunner()


def _tree(path):
    return sorted(str(p) for p in path.rglob("*"))


@pytest.fixture
def source(tmp_path, rng):
    src = tmp_path / "src" / "x.npy"
    src.parent.mkdir()
    np.save(src, rng.random((8, 1, 6)).astype("f4"))
    src.with_name("x.npy.yaml").write_text(yaml.safe_dump({"geometry": {"beam": "parallel"}}))
    return src


@pytest.mark.parametrize("site", ["../../escaped", "../escaped", "a/b", "/abs", ".."])
def test_cli_ingest_with_an_unsafe_site_creates_nothing_anywhere(tmp_path, source, site):
    work = tmp_path / "deep" / "er"
    store = work / "ROOT"
    store.mkdir(parents=True)
    before = _tree(tmp_path)
    res = runner.invoke(app, ["ingest", str(source), "--site", site, "--store", str(store)])
    assert res.exit_code == 2, res.output
    assert "site id is not a safe id" in res.output and "Traceback" not in res.output
    assert _tree(tmp_path) == before  # no escaped.zarr next to ROOT or above it, nothing inside ROOT


def test_cli_ingest_refuses_an_identifying_scan_id_without_echoing_it(tmp_path, source):
    store = tmp_path / "ROOT"
    res = runner.invoke(
        app, ["ingest", str(source), "--site", "a", "--store", str(store), "--scan-id", "DOE_JANE_19700101"]
    )
    assert res.exit_code == 2, res.output
    assert "scan id looks like identity" in res.output and "DOE" not in res.output


def test_cli_help_lists_every_accepted_suffix():
    for command in ("ingest", "watch"):
        res = runner.invoke(app, [command, "--help"])
        assert res.exit_code == 0
        text = re.sub(r"[\s│]+", " ", res.output)
        for suffix in accepted_suffixes():
            assert suffix in text, (command, suffix)


@pytest.fixture
def incoming(tmp_path, monkeypatch):
    from schemas.settings import get_settings

    folder = tmp_path / "incoming"
    folder.mkdir()
    monkeypatch.setenv("FEDSCAN_INCOMING", str(folder))
    get_settings.cache_clear()
    yield folder
    get_settings.cache_clear()


@pytest.mark.parametrize("site_ok", [True, False])
def test_on_scan_arrived_refuses_and_logs_a_payload_outside_incoming(tmp_path, source, incoming, site_ok):
    from flows.pipeline import on_scan_arrived

    class Keep(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.ERROR)
            self.records: list[logging.LogRecord] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.records.append(record)

    keep = Keep()
    logging.getLogger("fedscan").addHandler(keep)  # where run_logger() logs outside a Prefect run
    data = tmp_path / "data"
    before = _tree(tmp_path)
    path, site = (str(source), "site-a") if site_ok else (str(incoming / "x.npy"), "../../escaped")
    try:
        with pytest.raises(InvalidInputError, match="refused|not a safe"):
            on_scan_arrived.fn(path, site, str(data))
    finally:
        logging.getLogger("fedscan").removeHandler(keep)
    (record,) = keep.records
    assert "x.npy" not in record.getMessage()
    assert not data.exists() and _tree(tmp_path) == before


def test_flow_requests_refuse_unsafe_site_ids():
    from pydantic import ValidationError

    from flows.ingest import IngestRequest
    from flows.pipeline import ProcessScanRequest

    with pytest.raises(ValidationError, match="site id is not a safe id"):
        IngestRequest(site_id="../../escaped", sources=("a.npy",), data_root="d")
    with pytest.raises(ValidationError, match="site id is not a safe id"):
        ProcessScanRequest(source="a.npy", site_id="a/../../b")
    assert ProcessScanRequest(source="a.npy", site_id="A").site_id == "A"
