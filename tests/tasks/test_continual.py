"""Continuous learning: train only on new labelled scans, warm-start from the promoted model, and register each
run's model with its card through the promotion gate."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from schemas.federation import FederationConfig, FederationReport, RoundRecord
from schemas.registry import Outcome
from tasks.continual import build_card, plan_training, register_run
from tasks.federated.data import write_site_surrogates
from tasks.federated.model import build_model, get_arrays, shared_keys
from tasks.registry import ModelRegistry, weights_sha256
from tasks.storage import SiteStore
from tests.tasks.federated.conftest import make_site, synthetic_scans


@pytest.fixture
def root(tmp_path):
    make_site(tmp_path / "A.zarr", "A", 0, n_scans=2, n_slices=6)
    make_site(tmp_path / "B.zarr", "B", 1, n_scans=2, n_slices=6)
    return tmp_path


def _stores(root: Path) -> list[str]:
    return [str(root / "A.zarr"), str(root / "B.zarr")]


def _report(tmp_path: Path, config: FederationConfig, *, auc: float | None, loss: float | None = 0.4, seed: int = 0):
    model = build_model(config.task, base_channels=config.base_channels, seed=seed)
    arrays = get_arrays(model, shared_keys(model, fedbn=config.fedbn, local_statistics=config.local_bn_statistics))
    folder = tmp_path / f"run-{seed}" / "round-2"
    folder.mkdir(parents=True)
    torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, folder / "model.pt")
    rounds = tuple(
        RoundRecord(
            run_id="7",
            round=r,
            nodes_sampled=2,
            replies_ok=2,
            replies_failed=0,
            replies_rejected=0,
            aggregated=True,
            train_loss=loss,
            eval_auc=auc,
            bytes_down=1,
            bytes_up=1,
            seconds=1.0,
            model_dir=str(folder),
            site_metrics={"A": {"auc": 0.9, "loss": 0.3, "num-examples": 6.0}, "B": {"auc": 0.7, "loss": 0.5}},
        )
        for r in (1, 2)
    )
    report = FederationReport(
        run_id="7",
        mode="simulation",
        status="finished:completed",
        config_hash=config.config_hash(),
        rounds=rounds,
        final_model_dir=str(folder),
        wall_seconds=2.0,
    )
    return report, arrays


def test_a_run_with_no_new_labelled_scans_trains_nothing(root, tmp_path):
    config = FederationConfig(num_rounds=2, base_channels=4)
    first = plan_training(str(root), _stores(root), config)
    assert first.train and first.initial_model == "" and first.input_size == (32, 32)
    assert sorted(first.new) == ["A/scan-0", "A/scan-1", "B/scan-0", "B/scan-1"]
    report, arrays = _report(tmp_path, config, auc=0.8)
    card, decision = register_run(str(root), report, config, first)
    assert decision.outcome is Outcome.PROMOTED and card.sha256 == weights_sha256(arrays)
    assert card.training_data == first.inventory and [s.labelled_scans for s in card.sites] == [2, 2]
    assert card.sites[0].validation == {"auc": 0.9, "loss": 0.3}  # as the site computed it; counts dropped
    again = plan_training(str(root), _stores(root), config)
    assert not again.train and "nothing to train" in again.reason and again.new == ()

    # the same labels delivered again for a scan already used: still nothing new
    site = SiteStore.open(root / "A.zarr")
    labels = np.asarray(site.scan("scan-0").array("labels")[...])
    site.scan("scan-0").array("labels")[...] = labels
    assert not plan_training(str(root), _stores(root), config).train

    # one new labelled scan: train, warm-started from the promoted model
    extra = synthetic_scans(np.random.default_rng(5), n_scans=1, n_slices=6)
    write_site_surrogates(root / "C.zarr", site_id="C", scans=extra)
    third = plan_training(str(root), [*_stores(root), str(root / "C.zarr")], config)
    assert third.train and third.new == ("C/scan-0",)
    assert third.parent is not None and third.parent.version == card.version
    assert third.initial_model.endswith(f"{card.version}/weights.bin")
    # warm start off: the same data decision, a fresh model
    cold = plan_training(str(root), _stores(root), config.model_copy(update={"warm_start": False, "seed": 1}))
    assert cold.train and cold.initial_model == "" and "config changed" in cold.reason


def test_a_changed_label_counts_and_a_mismatched_model_is_not_warm_started_from(root, tmp_path):
    config = FederationConfig(num_rounds=2, base_channels=4)
    plan = plan_training(str(root), _stores(root), config)
    register_run(str(root), _report(tmp_path, config, auc=0.8)[0], config, plan)
    site = SiteStore.open(root / "B.zarr")
    labels = np.asarray(site.scan("scan-1").array("labels")[...])
    site.scan("scan-1").array("labels")[...] = 1 - labels
    wider = FederationConfig(num_rounds=2, base_channels=8)
    changed = plan_training(str(root), _stores(root), wider)
    assert changed.train and changed.new == ("B/scan-1",)
    assert changed.initial_model == "" and "cannot start this run" in changed.notes[0]


@pytest.mark.parametrize(("auc", "loss"), [(math.nan, 0.4), (None, 0.4), (0.8, math.nan)])
def test_a_diverged_run_is_registered_failed_and_not_promoted(root, tmp_path, auc, loss):
    config = FederationConfig(num_rounds=2, base_channels=4)
    plan = plan_training(str(root), _stores(root), config)
    good, _ = register_run(str(root), _report(tmp_path, config, auc=0.6, seed=1)[0], config, plan)
    bad, decision = register_run(str(root), _report(tmp_path, config, auc=auc, loss=loss, seed=2)[0], config, plan)
    assert decision.outcome is Outcome.FAILED
    registry = ModelRegistry.for_data_root(str(root))
    assert registry.current().version == good.version and bad.version in registry.versions()


def test_the_card_records_privacy_warm_start_and_fine_tuning(root, tmp_path):
    config = FederationConfig(
        num_rounds=2, base_channels=4, dp_mode="server", dp_noise_multiplier=1.0, personalisation_epochs=2
    )
    plan = plan_training(str(root), _stores(root), config)
    report, arrays = _report(tmp_path, config, auc=0.8)
    card = build_card(report, config, plan, arrays)
    assert card.privacy.dp_mode == "server" and card.privacy.epsilon is not None and card.privacy.epsilon > 0
    assert card.local_finetune_epochs == 2 and card.warm_start is False and card.parent is None
    assert card.rounds == 2 and card.strategy == "fedavg" and card.code_version
    json.loads(card.model_dump_json())  # shareable as plain JSON
