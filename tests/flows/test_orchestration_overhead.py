"""What keeps Prefect's own cost down without losing what the operator sees: the stage tag only when a limit on
it exists, no artifact calls outside a run (previews read stored arrays: tests/tasks/test_previews.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.storage import SiteStore
from tests.flows.test_pipeline_flows import make_site


def test_stage_tasks_carry_the_limit_tag_only_when_asked():
    from schemas.stages import PIPELINE
    from tasks.prefect_tasks import STAGE_TAG, scan_stage, stage_tasks

    plain = stage_tasks(tagged=False)
    tagged = stage_tasks(tagged=True)
    # one task per registry stage, named after it, in the registry's order
    assert [t.name for t in plain.values()] == [spec.name.value for spec in PIPELINE]
    assert [t.name for t in tagged.values()] == [spec.name.value for spec in PIPELINE]
    assert all(STAGE_TAG not in t.tags for t in plain.values())
    assert all(STAGE_TAG in t.tags for t in tagged.values())
    # the tagged copies keep the retry policy and the run names with the stage and the scan id
    for t in tagged.values():
        assert t.retries == scan_stage.retries == 2
        assert t.retry_condition_fn is scan_stage.retry_condition_fn
        assert t.task_run_name == scan_stage.task_run_name


@pytest.mark.slow
def test_stage_limit_is_seen_once_an_operator_creates_it(prefect_harness):
    from prefect.client.orchestration import get_client

    from tasks.prefect_tasks import STAGE_TAG, stage_limit_exists, stage_tasks

    assert stage_limit_exists() is False
    assert all(STAGE_TAG not in t.tags for t in stage_tasks().values())
    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag=STAGE_TAG, concurrency_limit=2)
    try:
        assert stage_limit_exists() is True
        assert all(STAGE_TAG in t.tags for t in stage_tasks().values())
    finally:
        with get_client(sync_client=True) as client:
            client.delete_concurrency_limit_by_tag(STAGE_TAG)
    assert stage_limit_exists() is False


def _reconstructed_scan(root: Path):
    import torch

    from schemas.pipeline import PipelineConfig
    from tasks.stages import run_scan_stage

    site = make_site(root, site_id="P", rows=3, cols=32, views=90)
    scan = site.scans()[0]
    run_scan_stage(scan, "reconstruct", PipelineConfig().reconstruct, device=torch.device("cpu"))
    return scan


def test_outside_a_run_no_artifact_is_attempted(tmp_path, monkeypatch):
    import prefect.artifacts

    from flows.pipeline import ScanOutcome
    from tasks.artifacts import in_prefect_run
    from tasks.pipeline_support import publish_run_report

    def refuse(*args, **kwargs):
        raise AssertionError("an artifact call outside a run would reach for an API (or start one)")

    for name in ("create_link_artifact", "create_table_artifact", "create_markdown_artifact"):
        monkeypatch.setattr(prefect.artifacts, name, refuse)
    assert in_prefect_run() is False
    _reconstructed_scan(tmp_path)
    path = publish_run_report(str(tmp_path), [ScanOutcome(scan="P/P-0", ok=True)], None)
    assert path is not None
    html = Path(path).read_text()
    assert "P/P-0" in html
    assert "data:image/png;base64," in html


@pytest.mark.slow
def test_nightly_runs_two_scans_at_once_with_no_worker_waiting_on_an_upstream(tmp_path, prefect_harness, monkeypatch):
    """Both scans' denoise stages must be in flight together: each waits at a barrier for the other. Had a worker
    picked up a stage whose upstream still runs (whole chains submitted at once), the second scan's denoise
    could not start and the barrier would break."""
    import threading

    import tasks.stages as stages
    from flows.pipeline import NightlyRequest, nightly
    from schemas.stages import StageName

    make_site(tmp_path, site_id="A", n_scans=2)
    barrier = threading.Barrier(2, timeout=120)  # a deadlock guard, not a measured time
    real = stages.STAGES[StageName.DENOISE]

    def denoise_together(scan, config, **kwargs):
        barrier.wait()
        return real.driver(scan, config, **kwargs)

    monkeypatch.setitem(stages.STAGES, StageName.DENOISE, stages.Stage(real.spec, denoise_together))
    report = nightly(NightlyRequest(data_root=str(tmp_path), federated=False, report=False))
    assert [o.ok for o in report.scans] == [True, True], report.scans
    assert not barrier.broken
    for scan in SiteStore.open(tmp_path / "A.zarr").scans():
        assert scan.is_done("surrogate")


def test_stage_progress_waits_then_throttles_and_always_reports_completion():
    from tasks.prefect_tasks import StageProgress

    now = [0.0]
    calls: list[tuple[str, float]] = []

    def publish(fn, percent):
        calls.append((fn.__name__, percent))

    progress = StageProgress("denoise of scan A/A-0", after_s=5.0, every_s=2.0, clock=lambda: now[0], publish=publish)
    for t, fraction in [(1.0, 0.1), (4.9, 0.3)]:  # a short stage: no artifact at all
        now[0] = t
        progress(fraction)
    assert calls == [] and not progress.created
    now[0] = 5.0
    progress(0.4)  # long enough: created with the fraction so far
    assert calls == [("_create", 40.0)]
    for t, fraction in [(5.5, 0.5), (6.9, 0.6)]:  # within every_s of the last call: skipped
        now[0] = t
        progress(fraction)
    now[0] = 7.1
    progress(0.7)
    now[0] = 7.2
    progress(1.0)  # completion is always reported
    assert calls == [("_create", 40.0), ("_update", 70.0), ("_update", 100.0)]


def test_artifact_publisher_runs_in_order_in_the_callers_context_and_logs_failures(caplog):
    import contextvars
    import threading

    from tasks.prefect_tasks import ArtifactPublisher

    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    seen: list[tuple[int, str, str]] = []
    gate = threading.Event()

    def call(k: int) -> None:
        gate.wait(5)
        seen.append((k, var.get(), threading.current_thread().name))

    def broken() -> None:
        raise RuntimeError("API said no")

    publisher = ArtifactPublisher()
    var.set("task-run-1")
    for k in range(5):
        publisher.submit(call, k)
    publisher.submit(broken)
    var.set("task-run-2")
    publisher.submit(call, 5)
    assert seen == []  # nothing ran inline: the caller went on at once
    gate.set()
    with caplog.at_level("WARNING"):
        assert publisher.flush() == 1
    assert [k for k, _, _ in seen] == [0, 1, 2, 3, 4, 5]
    assert [v for _, v, _ in seen] == ["task-run-1"] * 5 + ["task-run-2"]
    assert all(name.startswith("fedscan-artifacts") for _, _, name in seen)
    assert "API said no" in caplog.text
    assert publisher.flush() == 0  # flushed calls are not waited for (or reported) twice


@pytest.mark.slow
def test_nightly_stage_artifacts_and_progress_reach_the_api(tmp_path, prefect_harness, monkeypatch):
    """Artifacts made in the background are attached to their task runs and exist when the flow returns."""
    import asyncio

    from prefect.client.orchestration import get_client

    from flows.pipeline import NightlyRequest, nightly
    from schemas.settings import get_settings

    monkeypatch.setenv("FEDSCAN_PREFECT__PROGRESS_AFTER_S", "0")
    get_settings.cache_clear()
    try:
        make_site(tmp_path, site_id="Q", n_scans=1, seed=3)
        nightly(NightlyRequest(data_root=str(tmp_path), federated=False, report=False))
    finally:
        get_settings.cache_clear()

    async def artifacts() -> list:
        async with get_client() as client:
            return await client.read_artifacts()

    mine = [a for a in asyncio.run(artifacts()) if "Q-0" in (a.description or "") or "q-0" in (a.key or "")]
    cards = {a.key: str(a.data) for a in mine if a.type == "markdown"}
    assert set(cards) == {"denoise-q-q-0", "reconstruct-q-q-0", "surrogate-q-q-0"}  # one artifact per stage
    assert all("| metric | value |" in card and "| seconds |" in card for card in cards.values())
    assert "| noise_sigma |" in cards["denoise-q-q-0"]
    # by default (FEDSCAN_PRIVACY__SHARE_IMAGES unset) only the surrogate's image leaves: no plaintext slice
    assert "data:image/png;base64," not in cards["reconstruct-q-q-0"]
    assert "data:image/png;base64," in cards["surrogate-q-q-0"]
    assert not any(a.type == "table" for a in mine)
    assert all(a.task_run_id is not None for a in mine)  # attached to the stage's task run, not the flow
    progress = [a for a in mine if a.type == "progress"]
    assert {a.description.split(" of ")[0] for a in progress} == {"denoise", "reconstruct", "surrogate"}
    assert all(float(a.data) == 100.0 for a in progress)


def test_stage_card_is_one_markdown_with_the_metrics_table_then_the_image():
    from schemas.refs import ScanRef, StageReport
    from tasks.artifacts import png_markdown, stage_card

    ref = ScanRef(store_uri="/x/A.zarr", site_id="A", scan_id="A-3")
    report = StageReport(
        scan=ref,
        stage="reconstruct",
        skipped=False,
        config_hash="abc",
        seconds=1.23456,
        chunks_written=4,
        chunks_resumed=1,
        metrics={"psnr_db": 31.98765, "note": "a|b\nc"},
    )
    card = stage_card(report)
    lines = card.splitlines()
    assert lines[0] == "### reconstruct · A/A-3"
    assert lines[2:4] == ["| metric | value |", "|---|---|"]
    body = dict(line.strip("| ").split(" | ", 1) for line in lines[4:] if line.startswith("| "))
    assert body["seconds"] == "1.235" and body["chunks_written"] == "4" and body["chunks_resumed"] == "1"
    assert body["psnr_db"] == "31.99"
    assert body["note"] == "a\\|b c"  # a pipe or newline in a value cannot break the table
    assert "site" not in body and "stage" not in body  # already in the heading
    assert "data:image" not in card

    image = png_markdown("A/A-3 slice 2", b"\x89PNG-not-really")
    with_image = stage_card(report, image)
    assert with_image.startswith(card)  # the table first, then the image
    assert "#### A/A-3 slice 2" in with_image and "data:image/png;base64," in with_image
