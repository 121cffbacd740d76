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


# --- the README's settings and server recipe -------------------------------------------------------------------
#: FEDSCAN_… names the README uses that are not settings, and the file that reads each
NOT_SETTINGS = {
    "FEDSCAN_PROJECT_DIR": "prefect.yaml",  # the deployments' working directory (a pull step)
    "FEDSCAN_UI_SCREENSHOT": "tests/integration/test_services_end_to_end.py",
}


def _setting_env_names() -> dict[str, str]:
    """FEDSCAN_… environment name → the dotted attribute path of the setting (``dask.address``)."""
    from pydantic import BaseModel

    from schemas.settings import FedscanSettings

    names = {}
    for field, info in FedscanSettings.model_fields.items():
        sub = info.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            for inner in sub.model_fields:
                names[f"FEDSCAN_{field}__{inner}".upper()] = f"{field}.{inner}"
        else:
            names[f"FEDSCAN_{field}".upper()] = field
    return names


def test_every_fedscan_setting_the_readme_names_exists_and_is_read_by_code():
    readme = (ROOT / "README.md").read_text()
    named = set(re.findall(r"\bFEDSCAN_[A-Z0-9_]*[A-Z0-9]\b", readme))
    settings = _setting_env_names()
    unknown = named - settings.keys() - NOT_SETTINGS.keys()
    assert not unknown, f"the README names FEDSCAN_ settings that schemas/settings.py does not have: {unknown}"
    for name, where in NOT_SETTINGS.items():
        assert name in (ROOT / where).read_text(), (name, where)
    code = "\n".join(p.read_text() for d in ("flows", "tasks") for p in sorted((ROOT / d).rglob("*.py")))
    code += (ROOT / "prefect.yaml").read_text()
    # read as an attribute (sections are passed around, so ``.address`` of a DaskSettings) or by its env name
    unread = {
        name
        for name in named & settings.keys()
        if not re.search(rf"\.{settings[name].split('.')[-1]}\b", code) and name not in code
    }
    assert not unread, f"settings the README names that no code reads: {unread}"


def _server_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("### Against a Prefect server (one host)")
    return text[start : text.index("\n### ", start + 1)]


def test_readme_server_section_documents_every_deployment_and_works_on_one_host():
    section = _server_section()
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    for dep in spec["deployments"]:
        assert f"`{dep['name']}`" in section, f"deployment {dep['name']} is not documented"
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = [ln for ln in block.splitlines() if ln.strip()]
    first_prefect = next(i for i, ln in enumerate(lines) if ln.startswith("prefect "))
    assert any(ln.startswith("export PREFECT_API_URL=") for ln in lines[:first_prefect]), "PREFECT_API_URL unset"
    hosts = set(re.findall(r"(?:tcp|http)://([A-Za-z0-9_.-]+)", section)) | set(
        re.findall(r"--host ([A-Za-z0-9_.-]+)", section)
    )
    assert hosts <= {"127.0.0.1"}, f"example addresses that do not work on one host: {hosts}"
    assert "'.[s3]'" in section, "the s3 extra is not mentioned"


def test_deployments_use_the_work_pool_setting_and_send_heartbeats():
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    for dep in spec["deployments"]:
        pool = dep["work_pool"]
        assert pool["name"] == "{{ $FEDSCAN_PREFECT__WORK_POOL }}", dep["name"]
        assert 30 <= int(pool["job_variables"]["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"]) <= 60, dep["name"]


def test_zombie_automation_parses_and_outlasts_several_heartbeats():
    from prefect.events.schemas.automations import AutomationCore

    spec = yaml.safe_load((ROOT / "infra" / "automations.yaml").read_text())
    automations = {a["name"]: AutomationCore.model_validate(a) for a in spec["automations"]}
    zombie = automations["crash zombie flow runs"]
    heartbeat_s = int(
        yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"][0]["work_pool"]["job_variables"]["env"][
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"
        ]
    )
    assert zombie.trigger.within.total_seconds() >= 2 * heartbeat_s  # one late heartbeat is not a crash
    assert zombie.trigger.posture == "Proactive"
    assert [a.type for a in zombie.actions] == ["change-flow-run-state"]
    assert zombie.actions[0].state == "CRASHED"
