"""The server-side strategies, by name: one table that both ServerApp paths look up.

The names themselves live in :class:`schemas.federation.StrategyName` (schemas import nothing of ours), so the
schema refuses an unknown name with the list of valid ones before a run starts; this module gives each name its
factories:

* ``message_api``: the ``flwr.serverapp.strategy`` class of the Message-API rounds;
* ``secagg``: the legacy ``flwr.server.strategy`` class that Flower's SecAgg+ workflow drives, or ``None`` where
  the strategy needs individual updates (SecAgg+ only reveals their sum); ``SECAGG_STRATEGIES`` in the schema
  lists the same names, and a test holds the two together.

Adding a strategy: one ``StrategyName`` member (and, if it works under SecAgg+ or DP, its entry in
``SECAGG_STRATEGIES`` / ``DP_STRATEGIES``), one row here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from flwr.serverapp import strategy as fs

from schemas.federation import DpMode, FederationConfig, StrategyName
from tasks.errors import InvalidInputError

#: ``(config, common keyword arguments) -> strategy``.
MessageApiFactory = Callable[[FederationConfig, dict[str, Any]], fs.Strategy]
LegacyFactory = Callable[[FederationConfig, dict[str, Any]], Any]


@dataclass(frozen=True)
class StrategySpec:
    """How to build one named strategy on each ServerApp path."""

    message_api: MessageApiFactory
    secagg: LegacyFactory | None
    summary: str


def _legacy() -> Any:
    from flwr.server import strategy as ls  # the legacy API: imported only for SecAgg+ runs

    return ls


STRATEGIES: Mapping[StrategyName, StrategySpec] = {
    StrategyName.FEDAVG: StrategySpec(
        message_api=lambda c, kw: fs.FedAvg(**kw),
        secagg=lambda c, kw: _legacy().FedAvg(**kw),
        summary="weighted mean of the updates",
    ),
    StrategyName.FEDPROX: StrategySpec(
        message_api=lambda c, kw: fs.FedProx(proximal_mu=c.proximal_mu, **kw),
        secagg=lambda c, kw: _legacy().FedProx(proximal_mu=c.proximal_mu, **kw),
        summary="FedAvg aggregation; each client adds (mu/2)||w - w_global||^2 to its loss",
    ),
    StrategyName.FEDADAM: StrategySpec(
        message_api=lambda c, kw: fs.FedAdam(eta=c.server_learning_rate, **kw),
        secagg=lambda c, kw: _legacy().FedAdam(eta=c.server_learning_rate, **kw),
        summary="Adam step on the server over the mean update",
    ),
    StrategyName.FEDYOGI: StrategySpec(
        message_api=lambda c, kw: fs.FedYogi(eta=c.server_learning_rate, **kw),
        secagg=lambda c, kw: _legacy().FedYogi(eta=c.server_learning_rate, **kw),
        summary="Yogi step on the server over the mean update",
    ),
    StrategyName.FEDMEDIAN: StrategySpec(
        message_api=lambda c, kw: fs.FedMedian(**kw),
        secagg=None,
        summary="coordinate-wise median (robust; needs individual updates)",
    ),
    StrategyName.FEDTRIMMEDAVG: StrategySpec(
        message_api=lambda c, kw: fs.FedTrimmedAvg(beta=c.trimmed_fraction, **kw),
        secagg=None,
        summary="coordinate-wise trimmed mean (robust; needs individual updates)",
    ),
}


def look_up(name: StrategyName | str) -> StrategySpec:
    """The spec of ``name``.

    Raises
    ------
    InvalidInputError
        ``name`` is not a registered strategy (the message lists those that are).
    """
    try:
        return STRATEGIES[StrategyName(name)]
    except (ValueError, KeyError):
        valid = ", ".join(s.value for s in STRATEGIES)
        raise InvalidInputError(f"unknown strategy {name!r}; valid: {valid}") from None


def message_api_strategy(config: FederationConfig, common: dict[str, Any]) -> fs.Strategy:
    """The Message-API strategy of ``config.strategy``."""
    return look_up(config.strategy).message_api(config, common)


def build_strategy(cfg: FederationConfig, *, num_sampled: int) -> fs.Strategy:
    """The Message-API strategy of ``cfg``, inside Flower's DP fixed-clipping wrapper when ``cfg.dp_mode`` asks
    for one (``num_sampled``: the nodes per round the DP accountant assumes). It does not evaluate: the
    ServerApp's :class:`~tasks.federated.rounds.ScreeningStrategy` does."""
    common: dict[str, Any] = {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": 0.0,
        "min_train_nodes": cfg.min_available_clients,
        "min_available_nodes": cfg.min_available_clients,
    }
    base = message_api_strategy(cfg, common)
    if cfg.dp_mode is DpMode.SERVER:
        return fs.DifferentialPrivacyServerSideFixedClipping(
            base, cfg.dp_noise_multiplier, cfg.dp_clipping_norm, num_sampled
        )
    if cfg.dp_mode is DpMode.CLIENT:
        return fs.DifferentialPrivacyClientSideFixedClipping(
            base, cfg.dp_noise_multiplier, cfg.dp_clipping_norm, num_sampled
        )
    return base


def secagg_strategy(config: FederationConfig, common: dict[str, Any]) -> Any:
    """The legacy strategy SecAgg+'s workflow drives for ``config.strategy``.

    Raises
    ------
    InvalidInputError
        The strategy needs individual updates, which SecAgg+ hides (the schema refuses that config already).
    """
    factory = look_up(config.strategy).secagg
    if factory is None:
        raise InvalidInputError(f"strategy {config.strategy.value!r} needs individual updates; SecAgg+ hides them")
    return factory(config, common)


__all__ = ["STRATEGIES", "StrategySpec", "build_strategy", "look_up", "message_api_strategy", "secagg_strategy"]
