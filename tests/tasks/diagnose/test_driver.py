"""The diagnose stage on real site stores: not-applicable without a promoted model, predictions that name the
model, the site's own state of it, re-diagnosis after a promotion, refusals, and ``fedscan predict``."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import dask.array as da
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from schemas.diagnose import DiagnoseConfig
from schemas.registry import ModelCard, PrivacyCard, SiteCard
from schemas.stages import StageName, StageState
from schemas.surrogate import SurrogateConfig
from tasks.diagnose.driver import PREDICTION_MAP, PREDICTIONS, read_prediction, site_model
from tasks.diagnose.kernels import score_slices, slice_scores
from tasks.diagnose.site_models import load_site_state, save_site_state
from tasks.errors import InvalidInputError, StageIncompleteError
from tasks.federated.data import StandInSurrogateConfig, write_site_surrogates
from tasks.federated.model import build_model, get_arrays, shared_keys
from tasks.registry import ModelRegistry, weights_sha256
from tasks.stages import pending_stages, run_scan_stage
from tasks.storage import SiteStore, StageOutput

CPU = torch.device("cpu")
N, SIZE = 6, 16


def _site(root, rng, *, site_id="A", scans=2):
    items = []
    for k in range(scans):
        x = rng.normal(size=(N, SIZE, SIZE)).astype(np.float32)
        labels = np.array([0, 1] * (N // 2), np.uint8)
        masks = np.zeros((N, SIZE, SIZE), np.uint8)
        masks[labels == 1, 4:8, 4:8] = 1
        items.append((f"s{k}", x, labels, masks))
    site = write_site_surrogates(root / f"{site_id}.zarr", site_id=site_id, scans=items)
    for scan_id, x, _, _ in items:  # records as the pipeline leaves them: a volume, then its surrogate
        scan = site.scan(scan_id)
        ingest = scan.run_stage(
            stage="ingest",
            config=StandInSurrogateConfig(kind="stand-in volume"),
            outputs=[StageOutput("volume", da.from_array(x), ("slice", "y", "x"))],
        ).record
        scan.run_stage(
            stage="surrogate",
            config=SurrogateConfig(),
            inputs={"ingest": ingest.lineage()},
            outputs=[StageOutput("surrogate", da.from_array(x), ("slice", "y", "x"))],
            force=True,
        )
    return site


def _register(root, *, task="classify", seed=0, size=SIZE, promote=True, **kw):
    model = build_model(task, base_channels=4, seed=seed)
    arrays = get_arrays(model, shared_keys(model, fedbn=False, local_statistics=True))
    fields = {
        "sha256": weights_sha256(arrays),
        "task": task,
        "input_size": (size, size),
        "architecture": "LesionClassifier" if task == "classify" else "LesionUNet",
        "base_channels": 4,
        "fedbn": False,
        "local_bn_statistics": True,
        "sites": (SiteCard(site_id="A", labelled_scans=2),),
        "rounds": 1,
        "strategy": "fedavg",
        "privacy": PrivacyCard(secagg=False, dp_mode="off"),
        "metric_value": 0.7 + 0.01 * seed,
        "code_version": "test",
        "created_at": datetime.now(UTC),
    }
    fields.update(kw)
    registry = ModelRegistry.for_data_root(str(root))
    card = registry.register(ModelCard(**fields), arrays)
    if promote:
        registry.promote(card.version)
    return card


def _configs(diagnose: DiagnoseConfig | None = None):
    """The pipeline's default configs, with this diagnose config."""
    from schemas.pipeline import PipelineConfig

    cfg = PipelineConfig()
    configs = {name: cfg.stage_config(name) for name in StageName if name is not StageName.INGEST}
    configs[StageName.DIAGNOSE] = diagnose or DiagnoseConfig()
    return configs


def test_without_a_promoted_model_the_stage_is_not_applicable(tmp_path, rng):
    scan = _site(tmp_path, rng).scan("s0")
    run = run_scan_stage(scan, StageName.DIAGNOSE, DiagnoseConfig(), device=CPU)
    assert run.state is StageState.NOT_APPLICABLE and run.result is None
    assert pending_stages(scan, _configs()) == []
    assert PREDICTIONS not in scan.array_names() and read_prediction(scan) is None
    _register(tmp_path, promote=False)  # registered but not promoted: still nothing to diagnose with
    assert run_scan_stage(scan, StageName.DIAGNOSE, DiagnoseConfig(), device=CPU).state is StageState.NOT_APPLICABLE


def test_predictions_name_the_model_and_a_new_promotion_rediagnoses(tmp_path, rng):
    site = _site(tmp_path, rng)
    scan = site.scan("s0")
    card = _register(tmp_path, seed=1)
    assert StageName.DIAGNOSE in pending_stages(scan, _configs())
    config = DiagnoseConfig(slice_block=4, batch_slices=3)
    run = run_scan_stage(scan, StageName.DIAGNOSE, config, device=CPU)
    assert run.state is StageState.DONE
    rec = run.record
    assert rec.metrics["model_version"] == card.version and rec.metrics["model_sha256"] == card.sha256
    assert rec.config["model_sha256"] == card.sha256
    # the model keeps BatchNorm statistics at the sites and this site has none of it yet: re-estimated, then kept
    assert rec.metrics["adaptation"] == "recalibrated"
    assert load_site_state(site.uri, version=card.version, prefer_personal=False)[0] == "site"
    probs = np.asarray(scan.array(PREDICTIONS)[...])
    assert probs.shape == (N,) and np.all((probs > 0) & (probs < 1))
    assert scan.array(PREDICTIONS).attrs["model_version"] == card.version
    # the stored scores are the kernel's on the whole scan with the site's model
    _, arrays = ModelRegistry.for_data_root(str(tmp_path)).load(card.version)
    model, kind = site_model(site, card, arrays, device=CPU)
    assert kind == "site"
    surrogate = np.asarray(scan.array("surrogate")[...])
    np.testing.assert_allclose(probs, score_slices(model, surrogate, batch_size=N, device=CPU), atol=1e-6)
    # done with this model: skipped; a newly promoted model makes it pending and recomputes
    again = run_scan_stage(scan, StageName.DIAGNOSE, config, device=CPU)
    assert again.state is StageState.SKIPPED
    assert pending_stages(scan, _configs(config)) == []
    newer = _register(tmp_path, seed=2)
    assert pending_stages(scan, _configs(config)) == [StageName.DIAGNOSE]
    third = run_scan_stage(scan, StageName.DIAGNOSE, config, device=CPU)
    assert third.state is StageState.DONE and third.record.metrics["model_version"] == newer.version


def test_the_site_fine_tuned_model_is_preferred(tmp_path, rng):
    site = _site(tmp_path, rng)
    card = _register(tmp_path, seed=1, local_finetune_epochs=2)
    personal = build_model("classify", base_channels=4, seed=9)  # stands for the site's fine-tuned weights
    save_site_state(site.uri, version=card.version, kind="personal", state=personal.state_dict())
    run = run_scan_stage(site.scan("s1"), StageName.DIAGNOSE, DiagnoseConfig(), device=CPU)
    assert run.record.metrics["adaptation"] == "personal"
    x = np.asarray(site.scan("s1").array("surrogate")[...])
    expected = score_slices(personal.eval(), x, batch_size=4, device=CPU)
    np.testing.assert_allclose(np.asarray(site.scan("s1").array(PREDICTIONS)[...]), expected, atol=1e-6)


def test_segmentation_writes_a_probability_map(tmp_path, rng):
    site = _site(tmp_path, rng, scans=1)
    _register(tmp_path, task="segment", seed=1)
    scan = site.scan("s0")
    run = run_scan_stage(scan, StageName.DIAGNOSE, DiagnoseConfig(slice_block=4), device=CPU)
    assert set(run.record.outputs) == {PREDICTIONS, PREDICTION_MAP}
    pmap = np.asarray(scan.array(PREDICTION_MAP)[...])
    assert pmap.shape == (N, SIZE, SIZE)
    np.testing.assert_allclose(np.asarray(scan.array(PREDICTIONS)[...]), slice_scores(pmap), atol=1e-6)
    assert read_prediction(scan)["has_probability_map"] is True


def test_a_model_of_another_task_or_size_is_refused_and_nothing_is_written(tmp_path, rng):
    scan = _site(tmp_path, rng, scans=1).scan("s0")
    card = _register(tmp_path, seed=1)
    with pytest.raises(InvalidInputError, match=rf"model {card.version} was trained for task 'classify'"):
        run_scan_stage(scan, StageName.DIAGNOSE, DiagnoseConfig(task="segment"), device=CPU)
    other = _register(tmp_path, seed=2, size=32)
    # asked for by version: refused by name
    with pytest.raises(InvalidInputError, match=rf"model {other.version} was trained on 32x32 surrogates"):
        run_scan_stage(scan, StageName.DIAGNOSE, DiagnoseConfig(model_version=other.version), device=CPU)
    assert PREDICTIONS not in scan.array_names() and scan.stage_record(StageName.DIAGNOSE) is None


def test_a_promoted_model_for_another_slice_size_leaves_the_scan_not_applicable(tmp_path, rng, caplog):
    """A federation whose labelled sites have another grid: this scan has no model, which is not a failure."""
    scan = _site(tmp_path, rng, scans=1).scan("s0")
    other = _register(tmp_path, seed=2, size=32)
    with caplog.at_level("WARNING", logger="fedscan.diagnose"):
        run = run_scan_stage(scan, StageName.DIAGNOSE, DiagnoseConfig(), device=CPU)
    assert run.state is StageState.NOT_APPLICABLE
    assert pending_stages(scan, _configs()) == []
    assert f"the promoted model {other.version} takes 32x32 surrogates, this scan's are {SIZE}x{SIZE}" in caplog.text
    assert PREDICTIONS not in scan.array_names() and scan.stage_record(StageName.DIAGNOSE) is None


def test_incomplete_surrogates_are_never_scored(tmp_path, rng):
    scan = _site(tmp_path, rng, scans=1).scan("s0")
    _register(tmp_path, seed=1)
    scan._drop_record("surrogate")  # as a writer that died half-way leaves it: the array, no record
    with pytest.raises(StageIncompleteError, match="diagnose"):
        run_scan_stage(scan, StageName.DIAGNOSE, DiagnoseConfig(), device=CPU)
    assert PREDICTIONS not in scan.array_names()


def test_a_damaged_promoted_model_is_refused(tmp_path, rng):
    scan = _site(tmp_path, rng, scans=1).scan("s0")
    card = _register(tmp_path, seed=1)
    registry = ModelRegistry.for_data_root(str(tmp_path))
    path = f"{registry.root}/{card.version}/weights.bin"
    raw = bytearray(registry.fs.cat_file(path))
    raw[-2] ^= 0x10
    registry.fs.pipe_file(path, bytes(raw))
    with pytest.raises(Exception, match="changed or damaged"):
        run_scan_stage(scan, StageName.DIAGNOSE, DiagnoseConfig(), device=CPU)


def test_predict_prints_the_prediction_and_json(tmp_path, rng):
    from flows.cli import app

    site = _site(tmp_path, rng, scans=1)
    runner = CliRunner()
    missing = runner.invoke(app, ["predict", str(site.uri), "s0"])
    assert missing.exit_code == 2 and "no prediction yet" in missing.output
    card = _register(tmp_path, seed=1)
    run_scan_stage(site.scan("s0"), StageName.DIAGNOSE, DiagnoseConfig(threshold=0.5), device=CPU)
    out = runner.invoke(app, ["predict", str(site.uri), "s0", "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    probs = np.asarray(SiteStore.open(site.uri).scan("s0").array(PREDICTIONS)[...])
    np.testing.assert_allclose(doc["probabilities"], probs, atol=1e-6)
    assert doc["model_version"] == card.version and doc["flagged"] == [int(k) for k in np.flatnonzero(probs >= 0.5)]
    table = runner.invoke(app, ["predict", str(site.uri), "s0"])
    assert table.exit_code == 0 and f"model {card.version}" in table.output
    assert f"{len(doc['flagged'])} of {N} slices flagged" in table.output
    unknown = runner.invoke(app, ["predict", str(site.uri), "nope"])
    assert unknown.exit_code == 2 and "no scan 'nope'" in unknown.output


def test_models_cli_lists_shows_promotes_and_rolls_back(tmp_path):
    from flows.cli import app

    runner = CliRunner()
    root = str(tmp_path)
    assert "no model is promoted" in runner.invoke(app, ["models", "ls", "--root", root]).output
    first = _register(tmp_path, seed=1)
    second = _register(tmp_path, seed=2)
    listed = runner.invoke(app, ["models", "ls", "--root", root])
    assert listed.exit_code == 0 and first.version in listed.output and second.version in listed.output
    shown = runner.invoke(app, ["models", "show", "--root", root])
    assert shown.exit_code == 0 and json.loads(shown.output)["card"]["sha256"] == second.sha256
    back = runner.invoke(app, ["models", "rollback", "--root", root])
    assert back.exit_code == 0 and first.version in back.output
    assert ModelRegistry.for_data_root(root).current().version == first.version
    again = runner.invoke(app, ["models", "promote", second.version[:8], "--root", root])
    assert again.exit_code == 0 and ModelRegistry.for_data_root(root).current().version == second.version
    bad = runner.invoke(app, ["models", "promote", "0123456789", "--root", root])
    assert bad.exit_code == 2 and "0 models match" in bad.output


def test_an_unreadable_registry_fails_the_stage_by_name_and_discovery_goes_on(tmp_path, rng):
    from tasks.registry import ModelIntegrityError

    scan = _site(tmp_path, rng, scans=1).scan("s0")
    _register(tmp_path, seed=1)
    registry = ModelRegistry.for_data_root(str(tmp_path))
    registry.fs.pipe_file(f"{registry.root}/current.json", b"{not json")
    assert pending_stages(scan, _configs()) == [StageName.DIAGNOSE]  # discovery does not stop; the stage will say
    with pytest.raises(ModelIntegrityError, match="current.json does not parse"):
        run_scan_stage(scan, StageName.DIAGNOSE, DiagnoseConfig(), device=CPU)
