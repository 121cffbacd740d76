"""The project's own files hold together: deployments point at real flows, the README's commands exist."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import yaml
from prefect import Flow

ROOT = Path(__file__).resolve().parents[1]


def test_every_deployment_entrypoint_is_a_flow():
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert spec["deployments"], "prefect.yaml declares no deployments"
    for dep in spec["deployments"]:
        path, name = dep["entrypoint"].split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        assert isinstance(getattr(module, name), Flow), dep["entrypoint"]


def test_readme_quickstart_has_two_commands_and_ci_runs_the_second():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Quickstart.*?```bash\n(.*?)```", text, re.S)
    assert block is not None
    commands = [ln for ln in block.group(1).splitlines() if ln.strip() and not ln.startswith("#")]
    assert len(commands) == 2
    for cmd in commands:
        assert (ROOT / cmd.split()[0]).is_file(), cmd
    assert commands[1] in (ROOT / ".ci/run").read_text()


def test_deployments_name_the_shipped_pipeline_config():
    from schemas.pipeline import PipelineConfig

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    paths = [
        deployments["nightly"]["parameters"]["request"]["config_path"],
        deployments["on-scan-arrived"]["triggers"][0]["parameters"]["config_path"],
    ]
    for path in paths:
        assert PipelineConfig.from_yaml(ROOT / path) == PipelineConfig.from_yaml(ROOT / "configs" / "pipeline.yaml")


def test_shipped_pipeline_config_parses_and_unknown_keys_are_refused(tmp_path):
    from schemas.pipeline import ConfigFileError, PipelineConfig

    cfg = PipelineConfig.from_yaml(ROOT / "configs" / "pipeline.yaml")
    assert cfg.reconstruct.output_unit == "hu"
    assert cfg == PipelineConfig()  # the file spells out the defaults
    bad = tmp_path / "bad.yaml"
    bad.write_text("denoise:\n  views_per_grup: 8\n")
    import pytest

    with pytest.raises(ConfigFileError, match="unknown key 'denoise.views_per_grup'"):
        PipelineConfig.from_yaml(bad)
