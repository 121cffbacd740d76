"""Shared fixtures. Environment for Prefect/Flower is set before anything imports them."""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")

import numpy as np
import pytest


@pytest.fixture
def one_torch_thread():
    """One intra-op torch thread for the test, restored after. Tests of tiny convolutions and FBPs: on a shared,
    oversubscribed 2-core machine every parallel region of torch's OpenMP pool waits milliseconds for a
    descheduled peer thread (a 1-second test took 10 s, a training step ~100x longer) without changing a result."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API for the whole session (startup ~25 s; its own 30 s limit is too short here)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=None):
        yield


@pytest.fixture
def fedscan_env(monkeypatch: pytest.MonkeyPatch):
    """Set ``FEDSCAN_…`` variables for one test: ``fedscan_env(DEVICE="cpu")``; the cached settings are rebuilt."""
    from schemas.settings import get_settings

    def set_env(**values: str) -> None:
        for key, value in values.items():
            monkeypatch.setenv(f"FEDSCAN_{key}", value)
        get_settings.cache_clear()

    yield set_env
    get_settings.cache_clear()


@pytest.fixture
def device_setting_cpu(fedscan_env):
    """``FEDSCAN_DEVICE=cpu`` for this test: each stage's provenance records where it ran."""
    fedscan_env(DEVICE="cpu")


@pytest.fixture(scope="session")
def s3_env(tmp_path_factory):
    """A real S3 HTTP API on loopback (moto's server mode, as s3fs and zarr test against): the environment
    variables that point botocore/s3fs at it. One server for the session; each test makes its own bucket."""
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    import socket
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with log.open("w") as out:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(port)], stdout=out, stderr=out)
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, log.read_text()
            try:
                urllib.request.urlopen(env["AWS_ENDPOINT_URL"], timeout=1)
                break
            except urllib.error.HTTPError:
                break  # it answers
            except OSError:
                assert time.monotonic() < deadline, f"moto server did not start: {log.read_text()}"
                time.sleep(0.1)
        yield env
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture
def s3_bucket(s3_env, monkeypatch):
    """A fresh bucket on the moto server, with this test's environment pointed at it: ``s3://<name>``."""
    import uuid

    import s3fs

    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    bucket = f"fedscan-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
    yield f"s3://{bucket}"
    s3fs.S3FileSystem.clear_instance_cache()
