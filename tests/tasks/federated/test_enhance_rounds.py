"""The enhance task through the ServerApp's rounds and the ClientApp's handlers (in-process Grid: real Flower
messages, no processes): pairs built at each site, two rounds aggregated into a checkpoint the enhance stage
loads, a diverged site named and its update withheld, every site diverged → the run fails and no model becomes
current, sites without projection data skipped and named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from flwr.supercore.task_identity import TaskIdentity

from schemas.federation import FederatedTask, FederationConfig
from tasks.enhance.model import Architecture, load_checkpoint
from tasks.errors import InvalidInputError, TrainingDivergedError
from tasks.federated.client_app import TEST_SLEEP_ENV
from tasks.federated.enhance_task import CURRENT_CHECKPOINT, DIVERGED, ENHANCE_CHECKPOINT, enhance_sites
from tasks.federated.inprocess import run_in_process
from tasks.federated.runner import SimulationTarget, run_federation
from tasks.storage import SiteStore
from tests.flows.test_pipeline_flows import make_site
from tests.tasks.test_stages import add_image_scan

SIZE = 32


@pytest.fixture(autouse=True)
def _task_identity(one_torch_thread):
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A and B: projection sites of other view counts and doses; X: finite projections so large that the training
    loss overflows (a real inf loss, no fault hook); H: image-only (HU slices, no projections)."""
    root = tmp_path_factory.mktemp("enhance-sites")
    make_site(root, site_id="A", rows=4, cols=SIZE, views=32, i0=5e4, seed=0)
    make_site(root, site_id="B", rows=4, cols=SIZE, views=48, i0=5e3, seed=1)
    make_site(root, site_id="C", rows=4, cols=SIZE, views=40, i0=2e4, seed=4)
    for sid, seed in (("X", 2), ("Y", 3)):
        site = make_site(root, site_id=sid, rows=4, cols=SIZE, views=32, i0=5e4, seed=seed)
        arr = site.scan(f"{sid}-0").array("projections")
        arr[...] = np.asarray(arr[...]) * np.float32(1e20)
    add_image_scan(SiteStore.create(root / "H.zarr", site_id="H"), size=SIZE)
    return {sid: root / f"{sid}.zarr" for sid in "ABCXYH"}


def config(**kw) -> FederationConfig:
    base = dict(
        task="enhance",
        num_rounds=2,
        local_epochs=1,
        learning_rate=1e-3,
        batch_size=4,
        base_channels=4,
        min_available_clients=2,
        round_timeout_s=60,
        wait_for_nodes_s=5,
        enhance_grid_ny_px=SIZE,
        enhance_grid_nx_px=SIZE,
    )
    base.update(kw)
    return FederationConfig(**base)


def test_two_rounds_aggregate_into_a_checkpoint_the_stage_loads(stores, tmp_path):
    _, records = run_in_process(config(), [stores["A"], stores["B"]], tmp_path)
    assert [r.round for r in records] == [1, 2]
    assert all(r.aggregated and r.replies_ok == 2 and not r.failures for r in records)
    assert all(r.eval_psnr_db is not None and r.eval_ssim is not None and r.eval_auc is None for r in records)
    assert all(np.isfinite(r.train_loss) for r in records)
    ckpt = load_checkpoint(
        Path(records[-1].model_dir) / ENHANCE_CHECKPOINT, arch=Architecture(channels=4), grid=(32, 32)
    )
    assert ckpt.metadata["round"] == 2 and ckpt.metadata["target"] == "noise2inverse"
    # the checkpoint holds the aggregated weights of round 2 (model.pt is what the server aggregated)
    saved = torch.load(Path(records[-1].model_dir) / "model.pt")
    assert set(saved) == set(ckpt.state_dict)
    assert all(torch.equal(saved[k], ckpt.state_dict[k]) for k in saved)
    # training moved the weights off the identity network (its head starts at zero)
    assert float(ckpt.state_dict["head.weight"].abs().sum()) > 0
    # ... and it is refused for another grid or architecture, naming the field
    with pytest.raises(InvalidInputError, match="64x64 grid"):
        load_checkpoint(Path(records[-1].model_dir) / ENHANCE_CHECKPOINT, grid=(64, 64))
    with pytest.raises(InvalidInputError, match="channels 4 \\(expected 8\\)"):
        load_checkpoint(Path(records[-1].model_dir) / ENHANCE_CHECKPOINT, arch=Architecture(channels=8))
    # no run_in_process outcome path: finish() was called with no error, so the current model is the last round's
    current = tmp_path / CURRENT_CHECKPOINT
    assert current.read_bytes() == (Path(records[-1].model_dir) / ENHANCE_CHECKPOINT).read_bytes()
    # the server never received an image: only model-shaped arrays
    for entry in (json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()):
        for arr in entry["arrays"]:
            assert arr["name"] in saved and tuple(arr["shape"][-2:]) != (SIZE, SIZE)


def test_a_diverged_site_is_named_and_its_update_withheld(stores, tmp_path, caplog):
    caplog.set_level("WARNING", logger="fedscan.federated.server")
    _, records = run_in_process(config(num_rounds=1), [stores["A"], stores["B"], stores["X"]], tmp_path)
    (r,) = records
    assert r.aggregated and r.replies_ok == 2 and r.replies_failed == 1
    (failure,) = r.failures
    assert (failure.site, failure.phase, failure.reason.value) == ("X", "train", "error")
    assert DIVERGED in failure.detail and "'X'" in failure.detail
    assert any("site X" in m and DIVERGED in m for m in caplog.messages)
    ckpt = load_checkpoint(Path(r.model_dir) / ENHANCE_CHECKPOINT)
    assert all(torch.isfinite(v).all() for v in ckpt.state_dict.values())


def test_every_site_diverged_fails_the_run_and_saves_no_model(stores, tmp_path):
    current = tmp_path / CURRENT_CHECKPOINT
    with pytest.raises(TrainingDivergedError, match=r"every site's enhance training diverged \(X, Y\)"):
        run_in_process(config(num_rounds=2), [stores["X"], stores["Y"]], tmp_path)
    assert not current.exists()
    assert not list((tmp_path / "models").rglob("*.pt"))
    (record,) = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert not record["aggregated"] and {f["site"] for f in record["failures"]} == {"X", "Y"}


def test_sites_without_projection_data_are_skipped_and_named(stores, tmp_path):
    cfg = FederationConfig(task=FederatedTask.ENHANCE)
    ready, skipped, resolved = enhance_sites([str(stores[s]) for s in "AHB"], cfg)
    assert ready == [str(stores["A"]), str(stores["B"])]
    assert skipped == ("H: no projection scans (image-only data cannot make training pairs)",)
    assert (resolved.enhance_grid_ny_px, resolved.enhance_grid_nx_px) == (SIZE, SIZE)
    other = cfg.model_copy(update={"enhance_grid_ny_px": 64, "enhance_grid_nx_px": 64})
    with pytest.raises(InvalidInputError, match="0 site.*A: no projection scan on the 64x64 grid"):
        enhance_sites([str(stores[s]) for s in "AH"], other)
    with pytest.raises(InvalidInputError, match="H: no projection scans"):
        enhance_sites([str(stores["H"])], cfg.model_copy(update={"min_available_clients": 1}))
    # ... and the site-only run report names them
    from tasks.pipeline_support import publish_run_report

    report = publish_run_report(str(tmp_path), [], {"rounds": [], "skipped_sites": list(skipped)})
    assert skipped[0] in Path(report or "").read_text()


@pytest.mark.slow
@pytest.mark.integration
def test_two_rounds_through_the_flower_simulation_with_a_hung_site(stores, tmp_path, monkeypatch):
    """The flwr CLI and the Simulation Engine: A and B train two rounds, C hangs in training and is dropped after
    the round timeout, named; the enhance checkpoint of the last round becomes current."""
    monkeypatch.setenv(TEST_SLEEP_ENV, json.dumps({"C": 3600}))
    cfg = config(round_timeout_s=30, wait_for_nodes_s=90)
    report = run_federation(
        cfg,
        target=SimulationTarget(site_stores=[stores[s] for s in "ABC"]),
        output_dir=tmp_path,
        timeout_s=600,
        audit=True,
        engine_grace_s=10,
        round_timeout_cap_s=30,
    )
    r1, r2 = report.train_rounds
    assert r1.aggregated and r1.replies_ok == 2
    assert [(f.site, f.phase, f.reason.value) for f in r1.failures] == [("C", "train", "timeout")]
    assert r2.aggregated and r2.replies_ok == 2 and {f.site for f in r2.failures} == {"C"}
    assert r1.eval_psnr_db is not None and r2.eval_ssim is not None
    final = Path(report.final_model_dir) / ENHANCE_CHECKPOINT
    ckpt = load_checkpoint(final, arch=Architecture(channels=4), grid=(SIZE, SIZE))
    assert ckpt.metadata["round"] == 2
    assert (tmp_path / CURRENT_CHECKPOINT).read_bytes() == final.read_bytes()
    for line in next((tmp_path / "runs").glob("*/audit.jsonl")).read_text().splitlines():
        for arr in json.loads(line)["arrays"]:
            assert tuple(arr["shape"][-2:]) != (SIZE, SIZE), arr  # no image ever reached the server


def test_the_enhance_deployment_asks_for_an_enhance_run():
    from flows.federated import FederatedRequest

    spec = yaml.safe_load((Path(__file__).resolve().parents[3] / "prefect.yaml").read_text())
    (dep,) = [d for d in spec["deployments"] if d["name"] == "federated-enhance"]
    assert dep["entrypoint"] == "flows/federated.py:federated_training"
    assert FederatedRequest.model_validate(dep["parameters"]["request"]).config.task is FederatedTask.ENHANCE


def test_silobn_keeps_the_statistics_at_the_sites_and_the_checkpoint_says_so(stores, tmp_path):
    cfg = config(num_rounds=1, enhance_batchnorm=True, local_bn_statistics=True)
    _, (r,) = run_in_process(cfg, [stores["A"], stores["B"]], tmp_path)
    assert r.aggregated and r.eval_psnr_db is not None
    ckpt = load_checkpoint(Path(r.model_dir) / ENHANCE_CHECKPOINT)
    assert ckpt.arch.norm == "batch" and ckpt.metadata["bn_statistics"] == "site-local" and ckpt.site_local_statistics
    sent = {
        a["name"] for line in (tmp_path / "audit.jsonl").read_text().splitlines() for a in json.loads(line)["arrays"]
    }
    assert any(name.endswith(".weight") and ".1." in name for name in sent)  # BatchNorm scale is averaged ...
    assert not any("running_" in name or "num_batches" in name for name in sent)  # ... its statistics stay home
    with pytest.raises(ValueError, match="cannot use fedbn"):
        config(enhance_batchnorm=True, fedbn=True)


def test_the_shipped_enhance_training_config_asks_for_an_enhance_run():
    from schemas.pipeline import PipelineConfig

    cfg = PipelineConfig.from_yaml(Path(__file__).resolve().parents[3] / "configs" / "enhance-train.yaml")
    assert cfg.federation.task is FederatedTask.ENHANCE and not cfg.enhance.enabled


@pytest.mark.parametrize(
    "options",
    [
        {"secagg": True},
        {"secagg": True, "dp_mode": "client", "dp_noise_multiplier": 0.01, "dp_clipping_norm": 10.0},
        {"dp_mode": "server", "dp_noise_multiplier": 0.01, "dp_clipping_norm": 10.0},
        {"compression": "float16"},
        {"compression": "topk", "topk_fraction": 0.2},
        {"strategy": "fedprox", "proximal_mu": 0.1},
        {"strategy": "fedmedian"},
    ],
    ids=["secagg", "secagg-dp-client", "dp-server", "float16", "topk", "fedprox", "fedmedian"],
)
def test_privacy_compression_and_strategies_work_for_enhance(stores, tmp_path, options):
    """The strategy- and mod-level machinery is task-independent: each option aggregates the enhance network and
    its checkpoint loads."""
    _, records = run_in_process(config(num_rounds=1, **options), [stores["A"], stores["B"]], tmp_path)
    (r,) = records
    assert r.aggregated and r.replies_ok == 2 and not r.failures, r
    ckpt = load_checkpoint(Path(r.model_dir) / ENHANCE_CHECKPOINT, grid=(SIZE, SIZE))
    assert all(torch.isfinite(v).all() for v in ckpt.state_dict.values())
    if options.get("compression") == "float16":  # against the same round without compression
        _, (plain,) = run_in_process(config(num_rounds=1), [stores["A"], stores["B"]], tmp_path / "plain")
        assert r.array_bytes_up < 0.6 * plain.array_bytes_up
