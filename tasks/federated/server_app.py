"""Flower ServerApp (wiring only): rounds, aggregation by Flower's strategies, records and checkpoints.

Without SecAgg+ Flower's ``Strategy.start`` runs the rounds on the Message API. The strategy comes from the
registry in :mod:`tasks.federated.strategies` (optionally wrapped by Flower's DP fixed-clipping wrappers) and
is wrapped once more by :class:`~tasks.federated.rounds.ScreeningStrategy`, fedscan's side of a round: it
waits for the nodes with a deadline (Flower's own sampling waits forever), decodes compressed updates, refuses
non-finite or mis-shaped updates, names every site that times out, fails or is rejected, evaluates on the sites
that answered, writes one :class:`~schemas.federation.RoundRecord` per round and saves the global model under
``<models_dir>/<run_id>/round-<k>``. A round whose updates fall short of ``min_available_clients`` keeps the
previous global model and says so in its record. Before the first round a roll call asks each node for its
site id, so that failures are named by site.

With SecAgg+ Flower only offers the legacy workflow (``LegacyContext`` + ``DefaultWorkflow`` with
``SecAggPlusWorkflow``), so that path keeps its own driver over the legacy strategy of the same registry; a
delegating strategy records the rounds.

Every message the server receives passes :class:`~tasks.federated.grid.AuditingGrid`, which counts bytes,
(when ``audit_path`` is set) logs each message's array names, shapes and dtypes — never values — and keeps
nodes that have not answered their last message out of later rounds until they do.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from schemas.federation import (
    DpMode,
    FailureReason,
    FederatedTask,
    FederationConfig,
    RoundRecord,
    SiteFailure,
)
from tasks.federated.client_app import CONFIG_HASH, ROUND, SIGNATURE
from tasks.federated.grid import AuditingGrid, wait_for_nodes
from tasks.federated.model import get_arrays, model_for, model_signature, set_arrays, shared_keys
from tasks.federated.rounds import (
    RoundWriter,
    ScreeningStrategy,
    log_failure,
    record_of,
    roll_call,
    site_of,
    sort_replies,
    weighted_metrics,
)
from tasks.federated.strategies import build_strategy, secagg_strategy

LOG = logging.getLogger("fedscan.federated.server")
app = ServerApp()


def initial_arrays(cfg: FederationConfig, run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The shared arrays the first round starts from: the run config's ``initial_model`` (a registry weights file,
    warm start; any fsspec URL), else a fresh model from the seed. A file whose arrays are not exactly this
    model's shared entries (another task, size of layers or BatchNorm policy) is refused by name."""
    import fsspec

    from tasks.errors import InvalidInputError
    from tasks.registry import deserialize_arrays

    model = model_for(cfg)
    keys = shared_keys(model, fedbn=cfg.fedbn, local_statistics=cfg.local_bn_statistics)
    path = str(run_config.get("initial_model", "") or "")
    if path:
        with fsspec.open(path, "rb") as fh:
            arrays = deserialize_arrays(fh.read(), where=path)
        if sorted(arrays) != sorted(keys):
            raise InvalidInputError(f"warm-start model {path} does not hold this run's shared arrays (other model)")
        set_arrays(model, arrays)
        LOG.info("warm start from %s", path)
    return get_arrays(model, keys)


def run_message_api(
    grid: AuditingGrid,
    cfg: FederationConfig,
    writer: RoundWriter,
    base: ConfigRecord,
    start: Mapping[str, Any] | None = None,
) -> None:
    """Flower's :meth:`~flwr.serverapp.strategy.Strategy.start` runs the rounds of the configured strategy
    inside :class:`ScreeningStrategy`, from ``start`` (default: a fresh model); then the optional personalisation
    phase."""
    model = model_for(cfg)
    keys = shared_keys(model, fedbn=cfg.fedbn, local_statistics=cfg.local_bn_statistics)
    initial = record_of(dict(start) if start is not None else get_arrays(model, keys))
    nodes = wait_for_nodes(grid, minimum=cfg.min_available_clients, timeout_s=cfg.wait_for_nodes_s)
    inner = build_strategy(cfg, num_sampled=max(cfg.min_available_clients, int(len(nodes) * cfg.fraction_train)))
    screening = ScreeningStrategy(inner, grid=grid, cfg=cfg, writer=writer)
    screening.start(
        grid,
        initial,
        num_rounds=cfg.num_rounds,
        timeout=cfg.round_timeout_s,
        train_config=ConfigRecord(dict(base)),
        evaluate_config=base,
    )
    if cfg.personalisation_epochs > 0:
        personalise(grid, cfg, writer, screening.arrays or initial, base, sites=screening.sites)


def personalise(
    grid: AuditingGrid,
    cfg: FederationConfig,
    writer: RoundWriter,
    arrays: ArrayRecord,
    base: ConfigRecord,
    *,
    sites: Mapping[int, str],
) -> None:
    """Ask every node to fine-tune the final global model locally; record held-out metrics before/after."""
    t0 = time.perf_counter()
    down0, up0, adown0, aup0 = grid.bytes_down, grid.bytes_up, grid.array_bytes_down, grid.array_bytes_up
    nodes = list(grid.get_node_ids())
    msgs = [
        Message(RecordDict({"arrays": arrays, "config": base}), dst_node_id=n, message_type="train.personalise")
        for n in nodes
    ]
    replies = list(grid.send_and_receive(msgs, timeout=cfg.round_timeout_s))
    good, failures = sort_replies(
        msgs, replies, phase="personalise", server_round=0, sites=sites, timeout_s=cfg.round_timeout_s
    )
    rows = [dict(r.content.metric_records["metrics"]) for r in good]
    m = weighted_metrics(rows)
    writer.write(
        RoundRecord(
            run_id=writer.run_id,
            round=0,
            phase="personalise",
            nodes_sampled=len(msgs),
            replies_ok=len(rows),
            replies_failed=len(msgs) - len(rows),
            replies_rejected=0,
            aggregated=False,
            eval_loss=m.get("personal_loss"),
            eval_auc=m.get("personal_auc"),
            eval_accuracy=m.get("personal_accuracy"),
            eval_dice=m.get("personal_dice"),
            train_loss=None,
            bytes_down=grid.bytes_down - down0,
            bytes_up=grid.bytes_up - up0,
            array_bytes_down=grid.array_bytes_down - adown0,
            array_bytes_up=grid.array_bytes_up - aup0,
            seconds=time.perf_counter() - t0,
            failures=tuple(failures),
        )
    )


# ------------------------------------------------------------------------------------------------
# SecAgg+ path (Flower's legacy workflow)
# ------------------------------------------------------------------------------------------------
def run_secagg(
    grid: AuditingGrid,
    context: Context,
    cfg: FederationConfig,
    writer: RoundWriter,
    base: ConfigRecord,
    start: Mapping[str, Any] | None = None,
) -> None:
    """All rounds with SecAgg+: ``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow)`` over a legacy strategy."""
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server import strategy as ls
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    model = model_for(cfg)
    keys = shared_keys(model, fedbn=cfg.fedbn, local_statistics=cfg.local_bn_statistics)
    first = dict(start) if start is not None else get_arrays(model, keys)
    initial = ndarrays_to_parameters([first[k] for k in keys])
    nodes = wait_for_nodes(grid, minimum=cfg.min_available_clients, timeout_s=cfg.wait_for_nodes_s)
    sites, pending = roll_call(grid, nodes, timeout_s=cfg.wait_for_nodes_s)
    state: dict[str, Any] = {"t0": time.perf_counter(), "down": 0, "up": 0, "adown": 0, "aup": 0, "fit": {}}
    state["pending"] = pending

    def named(server_round: int, failures: Sequence[Any]) -> list[SiteFailure]:
        """The legacy workflow's failures ((proxy, result) or an exception), named where the node is known."""
        out = []
        for f in failures:
            node = int(f[0].node_id) if isinstance(f, tuple) else 0
            detail = str(f[1].status.message) if isinstance(f, tuple) else f"{type(f).__name__}: {f}"
            out.append(
                SiteFailure(
                    site=site_of(sites, node) if node else "unknown",
                    node_id=node,
                    phase="train",
                    reason=FailureReason.ERROR,
                    detail=detail[-500:],
                )
            )
        for x in out:
            log_failure(x, server_round)
        return out

    def fit_config(server_round: int) -> dict[str, Any]:
        state["t0"], state["down"], state["up"] = time.perf_counter(), grid.bytes_down, grid.bytes_up
        state["adown"], state["aup"] = grid.array_bytes_down, grid.array_bytes_up
        out = dict(base)
        out[ROUND] = server_round
        return out

    def fit_metrics(rows: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
        return weighted_metrics([{"num-examples": n, **m} for n, m in rows])

    def eval_metrics(rows: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
        return weighted_metrics([{"num-examples": n, **m} for n, m in rows])

    common: dict[str, Any] = {
        "fraction_fit": cfg.fraction_train,
        "fraction_evaluate": 1.0,
        "min_fit_clients": cfg.min_available_clients,
        "min_evaluate_clients": 1,
        "min_available_clients": cfg.min_available_clients,
        "initial_parameters": initial,
        "on_fit_config_fn": fit_config,
        "on_evaluate_config_fn": lambda r: {**dict(base), ROUND: r},
        "fit_metrics_aggregation_fn": fit_metrics,
        "evaluate_metrics_aggregation_fn": eval_metrics,
    }
    inner = secagg_strategy(cfg, common)
    if cfg.dp_mode is DpMode.CLIENT:
        inner = ls.DifferentialPrivacyClientSideFixedClipping(
            inner, cfg.dp_noise_multiplier, cfg.dp_clipping_norm, max(cfg.min_available_clients, len(nodes))
        )

    class Recording(ls.Strategy):
        """Delegates to the configured strategy; writes a record and a checkpoint per round."""

        def initialize_parameters(self, client_manager: Any) -> Any:
            return inner.initialize_parameters(client_manager)

        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
            return inner.configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
            params, metrics = inner.aggregate_fit(server_round, results, failures)
            state["fit"] = {
                "ok": len(results),
                "failed": len(failures),
                "failures": (*state.pop("pending", ()), *named(server_round, failures)),
                "metrics": metrics or {},
                "aggregated": params is not None and len(results) >= cfg.min_available_clients,
                "params": params,
            }
            return params, metrics

        def configure_evaluate(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
            return inner.configure_evaluate(server_round, parameters, client_manager)

        def aggregate_evaluate(self, server_round: int, results: Any, failures: Any) -> Any:
            loss, metrics = inner.aggregate_evaluate(server_round, results, failures)
            fit = state["fit"]
            model_dir = None
            if fit.get("aggregated") and fit.get("params") is not None:
                values = parameters_to_ndarrays(fit["params"])
                model_dir = writer.save_model(server_round, dict(zip(keys, values, strict=True)))
            m = metrics or {}
            writer.write(
                RoundRecord(
                    run_id=writer.run_id,
                    round=server_round,
                    nodes_sampled=int(fit.get("ok", 0)) + int(fit.get("failed", 0)),
                    replies_ok=int(fit.get("ok", 0)),
                    replies_failed=int(fit.get("failed", 0)),
                    replies_rejected=0,
                    aggregated=bool(fit.get("aggregated", False)),
                    train_loss=fit.get("metrics", {}).get("train_loss"),
                    eval_loss=m.get("loss"),
                    eval_auc=m.get("auc"),
                    eval_accuracy=m.get("accuracy"),
                    eval_dice=m.get("dice"),
                    eval_psnr_db=m.get("psnr_db"),
                    eval_ssim=m.get("ssim"),
                    bytes_down=grid.bytes_down - state["down"],
                    bytes_up=grid.bytes_up - state["up"],
                    array_bytes_down=grid.array_bytes_down - state["adown"],
                    array_bytes_up=grid.array_bytes_up - state["aup"],
                    seconds=time.perf_counter() - state["t0"],
                    model_dir=model_dir,
                    failures=tuple(fit.get("failures", ())),
                )
            )
            return loss, metrics

        def evaluate(self, server_round: int, parameters: Any) -> Any:
            return None

    legacy = LegacyContext(
        context=context,
        config=ServerConfig(num_rounds=cfg.num_rounds, round_timeout=cfg.round_timeout_s),
        strategy=Recording(),
    )
    workflow = DefaultWorkflow(
        fit_workflow=SecAggPlusWorkflow(
            num_shares=cfg.secagg_num_shares,
            reconstruction_threshold=cfg.secagg_reconstruction_threshold,
            clipping_range=cfg.secagg_clipping_range,
            quantization_range=cfg.secagg_quantization_range,
            timeout=cfg.round_timeout_s,
        )
    )
    workflow(grid, legacy)


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------
def round_writer(cfg: FederationConfig) -> type[RoundWriter]:
    """The enhance task's writer (its checkpoints, divergence and current model) or the plain one."""
    if cfg.task is FederatedTask.ENHANCE:
        from tasks.federated.enhance_task import EnhanceRoundWriter

        return EnhanceRoundWriter
    return RoundWriter


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Parse the run config, then run the rounds (Message API, or SecAgg+'s legacy workflow)."""
    cfg = FederationConfig.from_run_config(context.run_config)
    model = model_for(cfg)
    keys = shared_keys(model, fedbn=cfg.fedbn, local_statistics=cfg.local_bn_statistics)
    signature = model_signature(model, keys)
    writer = round_writer(cfg)(cfg, context.run_config, context.run_id, signature)
    audited = AuditingGrid(grid, audit_path=str(context.run_config.get("audit_path", "")))
    base = ConfigRecord({CONFIG_HASH: cfg.config_hash(), SIGNATURE: signature})
    try:
        start = initial_arrays(cfg, context.run_config)
        if cfg.secagg:
            run_secagg(audited, context, cfg, writer, base, start)
        else:
            run_message_api(audited, cfg, writer, base, start)
    except Exception as exc:
        writer.finish(exc)
        raise
    writer.finish(None)
