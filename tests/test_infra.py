"""infra/compose.yaml is validated statically: no Docker engine runs here."""

from __future__ import annotations

import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

from schemas.settings import FedscanSettings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "infra" / "compose.yaml"
BIN = Path(sys.executable).parent


@cache
def spec() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@cache
def cli_flags(*cmd: str) -> str:
    exe = BIN / cmd[0]
    out = subprocess.run([str(exe), *cmd[1:], "--help"], capture_output=True, text=True, timeout=120, check=False)
    return out.stdout + out.stderr


def test_services_reference_each_other_consistently():
    services = spec()["services"]
    needed = {
        "postgres",
        "prefect-server",
        "prefect-worker",
        "dask-scheduler",
        "dask-worker",
        "superlink",
        "minio",
        "watcher",
    }
    assert needed <= set(services)
    assert sum(1 for name in services if name.startswith("supernode-")) >= 3
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
        deps = svc.get("depends_on", [])
        for dep in deps if isinstance(deps, list) else list(deps):
            assert dep in services, f"{name} depends on unknown service {dep}"
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if not src.startswith("."):
                assert src in spec().get("volumes", {}), f"{name}: undeclared volume {src}"


def test_fedscan_environment_parses_into_settings(monkeypatch):
    env = spec()["x-fedscan"]["environment"]
    for key, value in env.items():
        if key.startswith("FEDSCAN_"):
            monkeypatch.setenv(key, str(value))
    s = FedscanSettings()
    assert s.data_root == "s3://fedscan"
    assert s.dask.address == "tcp://dask-scheduler:8786"
    assert s.flower.superlink_address == "superlink:9093"


@pytest.mark.parametrize(
    ("service", "program"),
    [
        ("superlink", ("flower-superlink",)),
        ("supernode-site-a", ("flower-supernode",)),
        ("dask-worker", ("dask", "worker")),
        ("dask-scheduler", ("dask", "scheduler")),
        ("prefect-worker", ("prefect", "worker", "start")),
    ],
)
def test_commands_use_flags_the_installed_tools_accept(service, program):
    cmd = spec()["services"][service]["command"]
    help_text = cli_flags(*program)
    flags = [part.split("=")[0] for part in cmd if part.startswith("--")]
    assert flags, cmd
    for flag in flags:
        assert flag in help_text, f"{service}: {program[0]} does not know {flag}"


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose (Debian package) not installed")
def test_docker_compose_config_accepts_the_file(tmp_path):
    env = tmp_path / ".env"
    env.write_text("POSTGRES_PASSWORD=x\nMINIO_ROOT_USER=u\nMINIO_ROOT_PASSWORD=p\n")
    out = subprocess.run(
        ["docker-compose", "--env-file", str(env), "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr


def test_dask_workers_get_the_allocator_settings_and_the_shared_environment():
    from schemas.settings import WORKER_ALLOCATOR_ENVIRON

    env = spec()["services"]["dask-worker"]["environment"]
    for key, value in WORKER_ALLOCATOR_ENVIRON.items():
        assert str(env[key]) == value, key
    shared = spec()["x-fedscan"]["environment"]
    assert {k: env[k] for k in shared} == shared  # the merge kept the common variables
