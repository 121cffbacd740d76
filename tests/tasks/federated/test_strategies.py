"""The strategy registry: every schema name has a factory, both ServerApp paths use it, unknown names are refused."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common import ndarrays_to_parameters
from flwr.serverapp import strategy as fs
from pydantic import ValidationError

from schemas.federation import (
    HASH_KEY,
    SECAGG_STRATEGIES,
    FederationConfig,
    RunConfigMismatchError,
    StrategyName,
)
from tasks.errors import InvalidInputError
from tasks.federated.strategies import STRATEGIES, build_strategy, look_up, message_api_strategy, secagg_strategy

MESSAGE_API = {
    StrategyName.FEDAVG: fs.FedAvg,
    StrategyName.FEDPROX: fs.FedProx,
    StrategyName.FEDADAM: fs.FedAdam,
    StrategyName.FEDYOGI: fs.FedYogi,
    StrategyName.FEDMEDIAN: fs.FedMedian,
    StrategyName.FEDTRIMMEDAVG: fs.FedTrimmedAvg,
}


def _config(name: StrategyName, **kw) -> FederationConfig:
    mu = {"proximal_mu": 0.1} if name is StrategyName.FEDPROX else {}
    return FederationConfig(strategy=name, **mu, **kw)


def test_every_schema_name_has_exactly_one_registry_row():
    assert set(STRATEGIES) == set(StrategyName)
    assert set(MESSAGE_API) == set(StrategyName)  # this test names the class of each one


@pytest.mark.parametrize("name", list(StrategyName))
def test_each_name_builds_its_own_flower_strategy(name):
    common = {"fraction_train": 1.0, "fraction_evaluate": 0.0, "min_train_nodes": 2, "min_available_nodes": 2}
    built = message_api_strategy(_config(name), dict(common))
    assert type(built) is MESSAGE_API[name]
    # what the ServerApp's Message-API path builds comes from the same table
    assert type(build_strategy(_config(name), num_sampled=2)) is MESSAGE_API[name]


@pytest.mark.parametrize("name", list(StrategyName))
def test_secagg_factories_exist_exactly_for_the_schema_s_secagg_strategies(name):
    assert (STRATEGIES[name].secagg is not None) == (name in SECAGG_STRATEGIES)
    cfg = FederationConfig.model_construct(**{**_config(name).model_dump(), "secagg": True})
    if name in SECAGG_STRATEGIES:
        initial = ndarrays_to_parameters([np.zeros(3, dtype=np.float32)])
        common = {"min_fit_clients": 2, "min_available_clients": 2, "initial_parameters": initial}
        legacy = secagg_strategy(cfg, common)
        assert type(legacy).__name__ == MESSAGE_API[name].__name__  # flwr.server.strategy's class of that name
    else:  # never silently another strategy: refused, even past the schema
        with pytest.raises(InvalidInputError, match="needs individual updates"):
            secagg_strategy(cfg, {})


def test_an_unknown_strategy_is_refused_by_the_schema_with_the_valid_names():
    with pytest.raises(ValidationError) as info:
        FederationConfig(strategy="fedsgd")
    assert all(f"'{s.value}'" in str(info.value) for s in StrategyName)
    rc = {**FederationConfig().to_run_config(), "strategy": "fedsgd", HASH_KEY: ""}
    with pytest.raises(RunConfigMismatchError, match="fedtrimmedavg"):
        FederationConfig.from_run_config(rc)
    with pytest.raises(InvalidInputError, match="valid: fedavg, fedprox, fedadam, fedyogi, fedmedian, fedtrimmedavg"):
        look_up("fedsgd")


def test_secagg_with_a_robust_strategy_is_refused_naming_the_usable_ones():
    with pytest.raises(ValidationError, match="one of fedavg, fedprox, fedadam, fedyogi"):
        FederationConfig(secagg=True, strategy="fedmedian")
