"""FederationConfig ↔ Flower run config, and the app's pyproject declaring exactly those keys."""

from __future__ import annotations

import tomllib

import pytest
from pydantic import ValidationError

from schemas.federation import HASH_KEY, RUNTIME_KEYS, FederationConfig, RunConfigMismatchError
from tasks.federated.runner import APP_DIR


def test_run_config_round_trip_is_flat_and_exact():
    cfg = FederationConfig(strategy="fedprox", proximal_mu=0.1, compression="topk", topk_fraction=0.05, fedbn=True)
    rc = cfg.to_run_config(metrics_path="/m.jsonl", models_dir="/models")
    assert all(isinstance(v, str | int | float | bool) for v in rc.values())
    assert FederationConfig.from_run_config(rc) == cfg


def test_from_run_config_refuses_unknown_missing_and_edited_keys():
    rc = FederationConfig().to_run_config()
    with pytest.raises(RunConfigMismatchError, match="does not know"):
        FederationConfig.from_run_config({**rc, "num-rounds": 3})
    short = dict(rc)
    del short["learning_rate"]
    with pytest.raises(RunConfigMismatchError, match="lacks"):
        FederationConfig.from_run_config(short)
    with pytest.raises(RunConfigMismatchError, match="does not match"):
        FederationConfig.from_run_config({**rc, "num_rounds": 7})  # edited without a new hash
    with pytest.raises(RunConfigMismatchError, match="invalid"):
        FederationConfig.from_run_config({**rc, "strategy": "fedsgd", HASH_KEY: ""})


@pytest.mark.parametrize(
    "bad",
    [
        {"strategy": "fedprox"},  # μ = 0
        {"secagg": True, "compression": "float16"},
        {"secagg": True, "dp_mode": "server"},
        {"secagg": True, "strategy": "fedmedian"},
        {"dp_mode": "client", "strategy": "fedmedian"},
        {"dp_mode": "server", "local_bn_statistics": False},  # noise on running variances: NaN model
        {"secagg": True, "secagg_num_shares": 2, "secagg_reconstruction_threshold": 3},
        {"round_timeout_s": 0},
    ],
)
def test_inconsistent_configs_are_refused(bad):
    with pytest.raises(ValidationError):
        FederationConfig(**bad)


def test_app_pyproject_declares_every_run_config_key_with_the_schema_defaults():
    with (APP_DIR / "pyproject.toml").open("rb") as fh:
        app = tomllib.load(fh)["tool"]["flwr"]["app"]
    declared = app["config"]
    expected = FederationConfig().to_run_config()
    assert set(declared) == set(expected)
    assert set(RUNTIME_KEYS) <= set(declared)
    assert FederationConfig.from_run_config(declared) == FederationConfig()
    assert app["components"]["serverapp"] == "tasks.federated.server_app:app"
    assert app["components"]["clientapp"] == "tasks.federated.client_app:app"
