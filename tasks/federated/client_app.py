"""Flower ClientApp (wiring only): one per site; trains on that site's surrogates and sends model updates. With
``task: enhance`` the train/evaluate/personalise work is :mod:`tasks.federated.enhance_task`'s (pairs built from the
site's own projections); the mods, checks and message formats below are the same.

The site store comes from the node, never from the server:

* Deployment Engine: ``flower-supernode --node-config "site-store='/data/A.zarr'"``.
* Simulation Engine: virtual nodes only get ``partition-id``; the machine that runs the simulation holds all
  sites, so the runner puts the list of store paths in the environment variable :data:`SIMULATION_STORES_ENV`
  of the simulation processes and partition ``i`` reads store ``i``.

Messages handled (Message API): ``query.site`` (roll call: the site id of this node, so that the server can
name a site that later times out or fails), ``train`` (local training, reply = updated shared arrays + metrics),
``evaluate`` (held-out metrics of the global model; with ``local_bn_statistics`` after re-estimating the
BatchNorm statistics on the site's training slices) and ``train.personalise`` (local fine-tuning after the
global rounds; only metrics leave). With ``secagg`` the server runs Flower's legacy SecAgg+ workflow, whose
``train`` messages use the legacy ``fitins``/``fitres`` layout; the same handlers answer them.

Mods on ``train`` (outermost first), each active only when the server asked for it:
SecAgg+ (``secaggplus_mod``), compression (ours), client-side DP clipping (``fixedclipping_mod``).
"""

from __future__ import annotations

import json
import os
import time
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

from schemas.federation import CompressionKind, FederatedTask, FederationConfig
from tasks.diagnose.site_models import SiteKind, save_site_state
from tasks.errors import InvalidInputError
from tasks.federated.compression import encode_update
from tasks.federated.data import SiteData, load_site_data, split_holdout
from tasks.federated.model import get_arrays, model_for, model_signature, set_arrays, shared_keys
from tasks.federated.training import evaluate as evaluate_model
from tasks.federated.training import recalibrate_batchnorm, train_local
from tasks.registry import weights_sha256
from tasks.storage import SiteStore

#: Environment variable holding a JSON list of site-store paths, indexed by simulation partition id.
SIMULATION_STORES_ENV = "FEDSCAN_SIMULATION_SITE_STORES"
#: Node-config key of the site store (Deployment Engine).
NODE_STORE_KEY = "site-store"
#: Fault injection for tests only: a JSON object ``{site_id: seconds}``; a ClientApp of a listed site sleeps that
#: long before it trains (a hung site). Read on every train message; unset in any real run.
TEST_SLEEP_ENV = "FEDSCAN_TEST_CLIENT_SLEEP_S"
#: Message type of the roll call, and the record/key of its reply.
ROLL_CALL = "query.site"
SITE_RECORD = "site"
SITE_KEY = "site-id"
#: Keys in the train/evaluate ConfigRecord the server sends.
CONFIG_HASH = "config-hash"
SIGNATURE = "model-signature"
ROUND = "server-round"
#: Reply ConfigRecord that says how the arrays are encoded.
COMPRESSION_RECORD = "compression"
#: context.state records.
_LOCAL_MODEL = "fedscan.local-model"
_RESIDUAL = "fedscan.topk-residual"
_SECAGG_CONFIGS = "secaggplus_configs"
_LEGACY_FIT = "fitins.parameters"
_LEGACY_EVAL = "evaluateins.parameters"
_CPU = torch.device("cpu")

app = ClientApp()


# ------------------------------------------------------------------------------------------------
# Node-side inputs
# ------------------------------------------------------------------------------------------------
def site_store_path(context: Context) -> str:
    """The site store of this node: ``node_config['site-store']``, or the simulation registry entry."""
    path = context.node_config.get(NODE_STORE_KEY)
    if isinstance(path, str) and path:
        return path
    registry = os.environ.get(SIMULATION_STORES_ENV)
    if registry and "partition-id" in context.node_config:
        stores = json.loads(registry)
        pid = int(context.node_config["partition-id"])
        if not 0 <= pid < len(stores):
            raise InvalidInputError(f"partition-id {pid} has no entry in {SIMULATION_STORES_ENV} ({len(stores)})")
        return str(stores[pid])
    raise InvalidInputError(
        f"this node has no site store: start the SuperNode with --node-config \"{NODE_STORE_KEY}='PATH'\""
    )


def _injected_sleep(site_id: str) -> None:
    """The test hook :data:`TEST_SLEEP_ENV`: sleep as a hung site would (never set outside tests)."""
    raw = os.environ.get(TEST_SLEEP_ENV)
    if not raw:
        return
    seconds = json.loads(raw).get(site_id)
    if seconds:
        time.sleep(float(seconds))


def _site_split(context: Context, cfg: FederationConfig) -> tuple[SiteData, SiteData]:
    data = load_site_data(site_store_path(context), task=cfg.task)
    return split_holdout(data, fraction=cfg.holdout_fraction, seed=cfg.holdout_seed)


def _local_model(context: Context, cfg: FederationConfig) -> tuple[torch.nn.Module, list[str]]:
    """The site's model: fresh from the seed, then its own saved state (FedBN layers, personalisation)."""
    model = model_for(cfg)
    if _LOCAL_MODEL in context.state.array_records:
        saved = context.state.array_records[_LOCAL_MODEL].to_torch_state_dict()
        model.load_state_dict(saved)
    return model, shared_keys(model, fedbn=cfg.fedbn, local_statistics=cfg.local_bn_statistics)


def _save_local(context: Context, model: torch.nn.Module) -> None:
    context.state.array_records[_LOCAL_MODEL] = ArrayRecord(model.state_dict())


def _keep_at_site(
    context: Context, arrays: Mapping[str, npt.NDArray[np.float32]], model: torch.nn.Module, kind: SiteKind
) -> None:
    """Persist the site's own state of this global model in the site's store (the diagnose stage reads it)."""
    version = weights_sha256(arrays)[:16]
    save_site_state(site_store_path(context), version=version, kind=kind, state=model.state_dict())


def _check_server(config: Mapping[str, Any], cfg: FederationConfig, model: torch.nn.Module, keys: list[str]) -> None:
    """Refuse a server that runs another configuration or another model."""
    theirs = config.get(CONFIG_HASH)
    if theirs is not None and theirs != cfg.config_hash():
        raise InvalidInputError(
            f"server config hash {theirs!r} differs from this client's {cfg.config_hash()!r} (config mismatch)"
        )
    sig = config.get(SIGNATURE)
    if sig is not None and sig != model_signature(model, keys):
        raise InvalidInputError(
            f"server model signature {sig!r} differs from this client's {model_signature(model, keys)!r} "
            "(model mismatch: different architecture or fedscan version)"
        )


def _generator(cfg: FederationConfig, site_id: str, server_round: int) -> torch.Generator:
    g = torch.Generator()
    seed = np.random.SeedSequence([cfg.seed, zlib.crc32(site_id.encode()), server_round]).generate_state(2, np.uint32)
    g.manual_seed(int(seed[0]) << 31 | int(seed[1]) >> 1)
    return g


def _receive_global(
    arrays: Mapping[str, npt.NDArray[np.float32]], config: Mapping[str, Any], context: Context
) -> tuple[FederationConfig, torch.nn.Module, list[str], SiteData, SiteData]:
    """What every message starts with: the run's config, this site's model with the server's ``arrays`` loaded
    (after refusing a server with another config or model), the shared keys and the site's train/held-out split."""
    cfg = FederationConfig.from_run_config(context.run_config)
    model, keys = _local_model(context, cfg)
    _check_server(config, cfg, model, keys)
    set_arrays(model, arrays)
    train, hold = _site_split(context, cfg)
    return cfg, model, keys, train, hold


def _site_statistics(cfg: FederationConfig, model: torch.nn.Module, train: SiteData) -> None:
    """With ``local_bn_statistics``: re-estimate the BatchNorm statistics on the site's training slices."""
    if cfg.local_bn_statistics:
        recalibrate_batchnorm(model, train.images, batch_size=cfg.batch_size, device=_CPU)


def _enhance_task(context: Context) -> Any:
    """:mod:`tasks.federated.enhance_task` when the run trains the enhance network, else None."""
    if FederationConfig.from_run_config(context.run_config).task is not FederatedTask.ENHANCE:
        return None
    from tasks.federated import enhance_task

    return enhance_task


# ------------------------------------------------------------------------------------------------
# The work of one message (format-independent)
# ------------------------------------------------------------------------------------------------
def _train(
    arrays: Mapping[str, npt.NDArray[np.float32]], config: Mapping[str, Any], context: Context
) -> tuple[dict[str, npt.NDArray[np.float32]], dict[str, float | int]]:
    if (enhance := _enhance_task(context)) is not None:
        return enhance.train(arrays, config, context, FederationConfig.from_run_config(context.run_config))
    cfg, model, keys, train, _ = _receive_global(arrays, config, context)
    _injected_sleep(train.site_id)
    anchor = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in arrays.items()}
    stats = train_local(
        model,
        train.images,
        train.targets,
        task=cfg.task,
        epochs=cfg.local_epochs,
        learning_rate=cfg.learning_rate,
        batch_size=cfg.batch_size,
        generator=_generator(cfg, train.site_id, int(config.get(ROUND, 0))),
        device=_CPU,
        proximal_mu=cfg.proximal_mu,
        anchor=anchor if cfg.proximal_mu > 0 else None,
    )
    _save_local(context, model)
    return get_arrays(model, keys), {"num-examples": stats.num_examples, "train_loss": stats.loss}


def _evaluate(
    arrays: Mapping[str, npt.NDArray[np.float32]], config: Mapping[str, Any], context: Context
) -> dict[str, float | int]:
    if (enhance := _enhance_task(context)) is not None:
        return enhance.evaluate(arrays, config, context, FederationConfig.from_run_config(context.run_config))
    cfg, model, _, train, hold = _receive_global(arrays, config, context)
    _site_statistics(cfg, model, train)
    if (cfg.fedbn or cfg.local_bn_statistics) and int(config.get(ROUND, 0)) == cfg.num_rounds:
        _keep_at_site(context, arrays, model, "site")  # the final model with this site's own BatchNorm layers
    metrics = evaluate_model(model, hold.images, hold.targets, task=cfg.task, batch_size=cfg.batch_size, device=_CPU)
    out: dict[str, float | int] = {"num-examples": hold.num_slices}
    out.update({k: v for k, v in metrics.items() if np.isfinite(v)})
    return out


def _personalise(
    arrays: Mapping[str, npt.NDArray[np.float32]], config: Mapping[str, Any], context: Context
) -> dict[str, float | int]:
    if (enhance := _enhance_task(context)) is not None:
        return enhance.personalise(arrays, config, context, FederationConfig.from_run_config(context.run_config))
    cfg, model, _, train, hold = _receive_global(arrays, config, context)
    kw: dict[str, Any] = {"task": cfg.task, "batch_size": cfg.batch_size, "device": _CPU}
    _site_statistics(cfg, model, train)
    before = evaluate_model(model, hold.images, hold.targets, **kw)
    if cfg.personalisation_epochs > 0:
        train_local(
            model,
            train.images,
            train.targets,
            epochs=cfg.personalisation_epochs,
            learning_rate=cfg.learning_rate,
            generator=_generator(cfg, train.site_id, 10**6),
            **kw,
        )
        _site_statistics(cfg, model, train)  # the fine-tuned weights need their own statistics
    after = evaluate_model(model, hold.images, hold.targets, **kw)
    _save_local(context, model)
    _keep_at_site(context, arrays, model, "personal")
    out: dict[str, float | int] = {"num-examples": hold.num_slices}
    out.update({f"global_{k}": v for k, v in before.items() if np.isfinite(v)})
    out.update({f"personal_{k}": v for k, v in after.items() if np.isfinite(v)})
    return out


def _named(values: list[npt.NDArray[Any]], context: Context) -> dict[str, npt.NDArray[np.float32]]:
    """Legacy (SecAgg+) messages carry an ordered list: name it by this client's shared keys."""
    cfg = FederationConfig.from_run_config(context.run_config)
    _, keys = _local_model(context, cfg)
    if len(values) != len(keys):
        raise InvalidInputError(f"server sent {len(values)} arrays, this model shares {len(keys)} (model mismatch)")
    return {k: np.asarray(v, dtype=np.float32) for k, v in zip(keys, values, strict=True)}


def _single_config(msg: Message) -> dict[str, Any]:
    records = list(msg.content.config_records.values())
    return dict(records[0]) if records else {}


# ------------------------------------------------------------------------------------------------
# Mods
# ------------------------------------------------------------------------------------------------
def optional_secaggplus_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """``secaggplus_mod`` for messages of Flower's SecAgg+ workflow; other messages pass straight through."""
    if _SECAGG_CONFIGS in msg.content.config_records:
        from flwr.client.mod import secaggplus_mod

        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def optional_clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's client-side fixed clipping when the server's DP wrapper sent a clipping norm."""
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    if _LEGACY_FIT in msg.content.array_records:
        cfg = msg.content.config_records.get("fitins.config", ConfigRecord())
        if KEY_CLIPPING_NORM in cfg:
            from flwr.client.mod import fixedclipping_mod as legacy_fixedclipping_mod

            return legacy_fixedclipping_mod(msg, context, call_next)
        return call_next(msg, context)
    if KEY_CLIPPING_NORM in _single_config(msg):
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def compression_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Replace the reply's arrays by the encoded update when the run asks for compression.

    Runs outside the DP clipping mod, so what is encoded is the clipped update. The reply gets a ConfigRecord
    :data:`COMPRESSION_RECORD` naming the encoding; top-k keeps its residual in ``context.state``.
    """
    if _LEGACY_FIT in msg.content.array_records:
        return call_next(msg, context)
    cfg = FederationConfig.from_run_config(context.run_config)
    if cfg.compression is CompressionKind.NONE:
        return call_next(msg, context)
    sent = {k: v.numpy() for k, v in next(iter(msg.content.array_records.values())).items()}
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    key, record = next(iter(reply.content.array_records.items()))
    local = {k: v.numpy() for k, v in record.items()}
    residual = None
    if _RESIDUAL in context.state.array_records:
        residual = context.state.array_records[_RESIDUAL]["residual"].numpy()
    encoded, left = encode_update(local, sent, kind=cfg.compression, topk_fraction=cfg.topk_fraction, residual=residual)
    if left is not None:
        context.state.array_records[_RESIDUAL] = ArrayRecord({"residual": Array(left)})
    reply.content.array_records[key] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in encoded.items()})
    reply.content.config_records[COMPRESSION_RECORD] = ConfigRecord(
        {"kind": cfg.compression.value, "values": int(sum(v.size for v in local.values()))}
    )
    return reply


# ------------------------------------------------------------------------------------------------
# Handlers
# ------------------------------------------------------------------------------------------------
@app.train(mods=[optional_secaggplus_mod, compression_mod, optional_clipping_mod])
def train(msg: Message, context: Context) -> Message:
    """Local training on this site's surrogates; replies with the shared arrays and the slice count."""
    if _LEGACY_FIT in msg.content.array_records:  # SecAgg+ workflow (legacy layout)
        fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
        arrays = _named(parameters_to_ndarrays(fitins.parameters), context)
        new, metrics = _train(arrays, dict(fitins.config), context)
        fitres = FitRes(
            status=Status(code=Code.OK, message=""),
            parameters=ndarrays_to_parameters(list(new.values())),
            num_examples=int(metrics["num-examples"]),
            metrics={"train_loss": float(metrics["train_loss"])},
        )
        return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)
    received = {k: v.numpy() for k, v in msg.content.array_records["arrays"].items()}
    new, metrics = _train(received, _single_config(msg), context)
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in new.items()}),
            "metrics": MetricRecord(dict(metrics)),
        }
    )
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Held-out metrics of the global model (with this site's own BatchNorm layers under FedBN)."""
    if _LEGACY_EVAL in msg.content.array_records:
        ins = compat.recorddict_to_evaluateins(msg.content, keep_input=True)
        metrics = _evaluate(_named(parameters_to_ndarrays(ins.parameters), context), dict(ins.config), context)
        from flwr.common import EvaluateRes

        res = EvaluateRes(
            status=Status(code=Code.OK, message=""),
            loss=float(metrics.get("loss", 0.0)),
            num_examples=int(metrics["num-examples"]),
            metrics={k: v for k, v in metrics.items() if k != "num-examples"},
        )
        return Message(compat.evaluateres_to_recorddict(res), reply_to=msg)
    received = {k: v.numpy() for k, v in msg.content.array_records["arrays"].items()}
    metrics = _evaluate(received, _single_config(msg), context)
    return Message(RecordDict({"metrics": MetricRecord(dict(metrics))}), reply_to=msg)


@app.query("site")
def site(msg: Message, context: Context) -> Message:
    """Roll call: this node's site id (no data is read beyond the store's own attributes)."""
    site_id = SiteStore.open(site_store_path(context), mode="r").site_id
    return Message(RecordDict({SITE_RECORD: ConfigRecord({SITE_KEY: site_id})}), reply_to=msg)


@app.train("personalise")
def personalise(msg: Message, context: Context) -> Message:
    """Fine-tune the final global model on this site only; reports held-out metrics before and after."""
    received = {k: v.numpy() for k, v in msg.content.array_records["arrays"].items()}
    metrics = _personalise(received, _single_config(msg), context)
    return Message(RecordDict({"metrics": MetricRecord(dict(metrics))}), reply_to=msg)


__all__ = ["app", "site_store_path"]
