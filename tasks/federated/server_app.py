"""Flower ServerApp (wiring only): rounds, aggregation by Flower's strategies, records and checkpoints.

Without SecAgg+ the rounds run on the Message API: the strategy from ``flwr.serverapp.strategy`` (optionally
wrapped by Flower's DP fixed-clipping wrappers) samples the nodes and aggregates; this module waits for the
nodes with a deadline (Flower's own sampling waits forever), decodes compressed updates, refuses non-finite or
mis-shaped updates, evaluates on the sites' held-out slices, writes one :class:`~schemas.federation.RoundRecord`
per round and saves the global model under ``<models_dir>/<run_id>/round-<k>``. A round whose updates fall
short of ``min_available_clients`` keeps the previous global model and says so in its record.

With SecAgg+ Flower only offers the legacy workflow (``LegacyContext`` + ``DefaultWorkflow`` with
``SecAggPlusWorkflow``), so that path uses the legacy strategies; a delegating strategy records the rounds.
Both paths build their strategy from the one table in :mod:`tasks.federated.strategies`.

Every message the server receives passes :class:`AuditingGrid`, which counts bytes and (when ``audit_path`` is
set) logs each message's array names, shapes and dtypes — never values.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp import strategy as fs

from schemas.federation import (
    CompressionKind,
    DpMode,
    FailurePhase,
    FailureReason,
    FederationConfig,
    RoundRecord,
    ServerOutcome,
    SiteFailure,
)
from tasks.errors import FedscanError, InvalidInputError
from tasks.federated.client_app import (
    COMPRESSION_RECORD,
    CONFIG_HASH,
    ROLL_CALL,
    ROUND,
    SIGNATURE,
    SITE_KEY,
    SITE_RECORD,
)
from tasks.federated.compression import decode_update
from tasks.federated.model import build_model, get_arrays, model_signature, shared_keys
from tasks.federated.strategies import message_api_strategy, secagg_strategy

LOG = logging.getLogger("fedscan.federated.server")
app = ServerApp()


class NotEnoughNodesError(FedscanError, TimeoutError):
    """Fewer than ``min_available_clients`` nodes connected within ``wait_for_nodes_s``."""


# ------------------------------------------------------------------------------------------------
# Grid wrapper: bytes and audit
# ------------------------------------------------------------------------------------------------
def _array_inventory(msg: Message) -> list[dict[str, Any]]:
    if msg.has_error() or not msg.has_content():
        return []
    out = []
    for rname, record in msg.content.array_records.items():
        for aname, arr in record.items():
            out.append({"record": rname, "name": aname, "shape": list(arr.shape), "dtype": str(arr.dtype)})
    for rname, crec in msg.content.config_records.items():
        for cname, value in crec.items():
            if isinstance(value, bytes | list):
                size = len(value) if isinstance(value, bytes) else sum(len(v) for v in value if isinstance(v, bytes))
                out.append({"record": rname, "name": cname, "shape": [size], "dtype": "bytes"})
    return out


def _array_bytes(msg: Message) -> int:
    """Payload bytes of a message: array values (no names, shapes or headers), plus the ``bytes`` values of its
    config records (SecAgg+ sends keys, shares and its masked vectors that way)."""
    if msg.has_error() or not msg.has_content():
        return 0
    total = 0
    for rec in msg.content.array_records.values():
        for arr in rec.values():
            if arr.dtype:  # a numpy array
                total += int(np.prod(arr.shape, dtype=np.int64)) * np.dtype(arr.dtype).itemsize
            else:  # legacy (SecAgg+ workflow) parameters: opaque serialized bytes
                total += len(arr.data)
    for crec in msg.content.config_records.values():
        for value in crec.values():
            items = value if isinstance(value, list) else [value]
            total += sum(len(v) for v in items if isinstance(v, bytes))
    return int(total)


def wire_bytes(msg: Message) -> int:
    """Serialized size of the whole message (Flower's protobuf ``Message``: metadata, every record, keys,
    array headers, metrics, configs) — what a transport carries before framing and TLS."""
    from flwr.common.serde import message_to_proto

    return int(message_to_proto(msg).ByteSize())


class AuditingGrid(Grid):
    """A :class:`Grid` that counts the bytes it sends and receives (serialized messages and their array payloads),
    logs what it receives, and keeps busy nodes out of the rounds.

    A node whose message went unanswered by the timeout is *busy* until its late reply arrives: it is left out of
    :meth:`get_node_ids` (so no strategy samples it and no round counts it as available), since a hung ClientApp
    would otherwise be handed one more message per round (in the Simulation Engine each one holds a worker).
    """

    def __init__(self, grid: Grid, *, audit_path: str = "") -> None:
        self._grid = grid
        self._audit = Path(audit_path) if audit_path else None
        self.bytes_down = 0
        self.bytes_up = 0
        self.array_bytes_down = 0
        self.array_bytes_up = 0
        #: node id -> (id of its unanswered message, what that message was: "round 2 train" etc.)
        self.busy: dict[int, tuple[str, str]] = {}

    def _count_down(self, msgs: list[Message]) -> None:
        self.bytes_down += sum(wire_bytes(m) for m in msgs)
        self.array_bytes_down += sum(_array_bytes(m) for m in msgs)

    # delegation -----------------------------------------------------------------------------
    def set_run(self, run: Any) -> None:  # pragma: no cover - the inner grid is already set up
        self._grid.set_run(run)

    @property
    def run(self) -> Any:
        return self._grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        """The connected nodes that are not busy (a busy node whose late reply has arrived is free again)."""
        self._collect_late_replies()
        return [n for n in self._grid.get_node_ids() if n not in self.busy]

    def busy_nodes(self) -> dict[int, str]:
        """Connected nodes still working on an unanswered message, and which message."""
        connected = set(self._grid.get_node_ids())
        return {n: what for n, (_, what) in self.busy.items() if n in connected}

    def _collect_late_replies(self) -> None:
        if not self.busy:
            return
        late = list(self._grid.pull_messages([mid for mid, _ in self.busy.values()]))
        done = {m.metadata.reply_to_message_id for m in late}
        for node, (mid, what) in list(self.busy.items()):
            if mid in done:
                LOG.info("node %d answered its %s late; it takes part again", node, what)
                del self.busy[node]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        msgs = list(messages)
        self._count_down(msgs)
        return self._grid.push_messages(msgs)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self._grid.pull_messages(message_ids))
        self._record(replies)
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None, what: str = ""
    ) -> Iterable[Message]:
        """Flower's ``send_and_receive``; every node left without a reply becomes busy (``what`` names the
        message in logs)."""
        msgs = list(messages)
        self._count_down(msgs)
        replies = list(self._grid.send_and_receive(msgs, timeout=timeout))
        self._record(replies)
        answered = {m.metadata.reply_to_message_id for m in replies}
        for m in msgs:
            if m.metadata.message_id and m.metadata.message_id not in answered:
                self.busy[int(m.metadata.dst_node_id)] = (m.metadata.message_id, what or m.metadata.message_type)
        return replies

    def _record(self, replies: list[Message]) -> None:
        self.bytes_up += sum(wire_bytes(m) for m in replies)
        self.array_bytes_up += sum(_array_bytes(m) for m in replies)
        if self._audit is None:
            return
        with self._audit.open("a", encoding="utf-8") as fh:
            for m in replies:
                entry = {
                    "src_node_id": int(m.metadata.src_node_id),
                    "message_type": m.metadata.message_type,
                    "error": m.has_error(),
                    "arrays": _array_inventory(m),
                }
                fh.write(json.dumps(entry) + "\n")


# ------------------------------------------------------------------------------------------------
# Outputs
# ------------------------------------------------------------------------------------------------
class RoundWriter:
    """Appends round records to the metrics file and saves global models."""

    def __init__(self, cfg: FederationConfig, run_config: Mapping[str, Any], run_id: int, signature: str) -> None:
        self.cfg = cfg
        self.run_id = str(run_id)
        self.signature = signature
        metrics = str(run_config.get("metrics_path", ""))
        models = str(run_config.get("models_dir", ""))
        outcome = str(run_config.get("outcome_path", ""))
        self.metrics_path = Path(metrics) if metrics else None
        self.models_root = Path(models) / self.run_id if models else None
        self.outcome_path = Path(outcome) if outcome else None
        self.rounds = 0

    def save_model(self, server_round: int, arrays: Mapping[str, npt.NDArray[np.float32]]) -> str | None:
        if self.models_root is None:
            return None
        folder = self.models_root / f"round-{server_round}"
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "model.pt.tmp"
        torch.save({k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in arrays.items()}, tmp)
        tmp.replace(folder / "model.pt")
        meta = {
            "run_id": self.run_id,
            "round": server_round,
            "task": self.cfg.task.value,
            "base_channels": self.cfg.base_channels,
            "fedbn": self.cfg.fedbn,
            "local_bn_statistics": self.cfg.local_bn_statistics,
            "config_hash": self.cfg.config_hash(),
            "model_signature": self.signature,
            "config": self.cfg.model_dump(mode="json"),
        }
        (folder / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        return str(folder)

    def finish(self, error: BaseException | None) -> None:
        """Write the :class:`ServerOutcome` (atomically): the runner's sign that the rounds are over."""
        if self.outcome_path is None:
            return
        outcome = ServerOutcome(
            status="completed" if error is None else "failed",
            error="" if error is None else f"{type(error).__name__}: {error}"[:2000],
            rounds=self.rounds,
        )
        tmp = self.outcome_path.with_suffix(".tmp")
        tmp.write_text(outcome.model_dump_json(), encoding="utf-8")
        tmp.replace(self.outcome_path)

    def write(self, record: RoundRecord) -> None:
        if record.phase == "train":
            self.rounds += 1
        LOG.info(
            "round %d: %d ok, %d failed, %d rejected, auc=%s, %.1f s",
            record.round,
            record.replies_ok,
            record.replies_failed,
            record.replies_rejected,
            record.eval_auc,
            record.seconds,
        )
        if self.metrics_path is None:
            return
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        with self.metrics_path.open("a", encoding="utf-8") as fh:
            fh.write(record.model_dump_json() + "\n")


def weighted_metrics(rows: Sequence[Mapping[str, Any]], *, weight_key: str = "num-examples") -> dict[str, float]:
    """Weighted mean of every numeric, finite metric over the rows (a metric missing in a row is skipped)."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for row in rows:
        w = float(row.get(weight_key, 1) or 0)
        for k, v in row.items():
            if k == weight_key or isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                continue
            sums[k] = sums.get(k, 0.0) + w * float(v)
            weights[k] = weights.get(k, 0.0) + w
    return {k: sums[k] / weights[k] for k in sums if weights[k] > 0}


# ------------------------------------------------------------------------------------------------
# Message-API path
# ------------------------------------------------------------------------------------------------
def wait_for_nodes(grid: Grid, *, minimum: int, timeout_s: float) -> list[int]:
    """Node ids once at least ``minimum`` are connected; :class:`NotEnoughNodesError` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= minimum:
            return nodes
        if time.monotonic() > deadline:
            raise NotEnoughNodesError(f"{len(nodes)} nodes connected after {timeout_s:.0f} s; need {minimum}")
        time.sleep(0.5)


def make_strategy(cfg: FederationConfig, *, num_sampled: int) -> fs.Strategy:
    """The Message-API strategy of ``cfg`` (evaluation is done by this module, not by the strategy)."""
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


def screen_update(
    reply: Message, reference: Mapping[str, npt.NDArray[np.float32]]
) -> dict[str, npt.NDArray[np.float32]]:
    """The model arrays of one train reply (decoded when compressed), checked against the global model.

    Raises
    ------
    InvalidInputError
        Not exactly one ArrayRecord, keys or shapes that differ from the global model, or NaN/inf values.
    """
    records = list(reply.content.array_records.values())
    if len(records) != 1:
        raise InvalidInputError(f"a train reply holds one ArrayRecord, got {len(records)}")
    encoded = {k: v.numpy() for k, v in records[0].items()}
    kind = CompressionKind.NONE
    if COMPRESSION_RECORD in reply.content.config_records:
        kind = CompressionKind(str(reply.content.config_records[COMPRESSION_RECORD]["kind"]))
    if kind is CompressionKind.NONE:
        if set(encoded) != set(reference):
            raise InvalidInputError("update keys differ from the global model's (model mismatch)")
        decoded = {}
        for k, ref in reference.items():
            if encoded[k].shape != ref.shape:
                raise InvalidInputError(f"update {k!r} has shape {encoded[k].shape}, the model {ref.shape}")
            decoded[k] = np.asarray(encoded[k], dtype=np.float32)
    else:
        for v in encoded.values():
            if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all():
                raise InvalidInputError("update holds NaN or inf")
        decoded = decode_update(encoded, reference, kind=kind)
    for k, v in decoded.items():
        if not np.isfinite(v).all():
            raise InvalidInputError(f"update {k!r} holds NaN or inf")
    return decoded


def _arrays_of(record: ArrayRecord) -> dict[str, npt.NDArray[np.float32]]:
    return {k: np.asarray(v.numpy(), dtype=np.float32) for k, v in record.items()}


def _record_of(arrays: Mapping[str, npt.NDArray[np.float32]]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def _site_of(sites: Mapping[int, str], node: int) -> str:
    return sites.get(node, f"node-{node}")


def sort_replies(
    sent: Sequence[Message],
    replies: Sequence[Message],
    *,
    phase: FailurePhase,
    server_round: int,
    sites: Mapping[int, str],
    timeout_s: float,
) -> tuple[list[Message], list[SiteFailure]]:
    """Split the replies to ``sent`` into the good ones and one :class:`SiteFailure` per site that timed out
    (no reply within ``timeout_s``: dropped from the round) or answered with an error; each failure is logged
    at WARNING with the site's name and reason."""
    answered = {int(r.metadata.src_node_id) for r in replies}
    failures = [
        SiteFailure(
            site=_site_of(sites, int(m.metadata.dst_node_id)),
            node_id=int(m.metadata.dst_node_id),
            phase=phase,
            reason=FailureReason.TIMEOUT,
            detail=f"no reply within {timeout_s:g} s",
        )
        for m in sent
        if int(m.metadata.dst_node_id) not in answered
    ]
    good: list[Message] = []
    for r in replies:
        if r.has_error():
            node = int(r.metadata.src_node_id)
            failures.append(
                SiteFailure(
                    site=_site_of(sites, node),
                    node_id=node,
                    phase=phase,
                    reason=FailureReason.ERROR,
                    detail=str(r.error.reason)[-500:],
                )
            )
        else:
            good.append(r)
    for f in failures:
        log_failure(f, server_round)
    return good, failures


def log_failure(failure: SiteFailure, server_round: int) -> None:
    """One WARNING line naming the site, what it missed and why."""
    LOG.warning(
        "site %s (node %d) dropped from round %d (%s): %s: %s",
        failure.site,
        failure.node_id,
        server_round,
        failure.phase,
        failure.reason.value,
        failure.detail,
    )


def roll_call(grid: Grid, nodes: Sequence[int], *, timeout_s: float) -> tuple[dict[int, str], list[SiteFailure]]:
    """Ask every node for its site id (``query.site``), so that a site that later hangs or fails is named.

    The first message a node gets also pays its start-up (a cold ClientApp process or Ray actor importing torch),
    so callers give the roll call the time they allow nodes to connect, not the round timeout."""
    msgs = [Message(RecordDict(), dst_node_id=n, message_type=ROLL_CALL) for n in nodes]
    replies = list(grid.send_and_receive(msgs, timeout=timeout_s))
    good, failures = sort_replies(msgs, replies, phase="roll-call", server_round=0, sites={}, timeout_s=timeout_s)
    sites: dict[int, str] = {}
    for r in good:
        if SITE_RECORD in r.content.config_records:
            sites[int(r.metadata.src_node_id)] = str(r.content.config_records[SITE_RECORD][SITE_KEY])
    return sites, failures


def _evaluate_round(
    grid: AuditingGrid,
    nodes: list[int],
    arrays: ArrayRecord,
    config: ConfigRecord,
    *,
    server_round: int,
    sites: Mapping[int, str],
    timeout: float,
) -> tuple[dict[str, float], list[SiteFailure]]:
    msgs = [
        Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=n, message_type=MessageType.EVALUATE)
        for n in nodes
    ]
    replies = list(grid.send_and_receive(msgs, timeout=timeout, what=f"round-{server_round} evaluate"))
    good, failures = sort_replies(
        msgs, replies, phase="evaluate", server_round=server_round, sites=sites, timeout_s=timeout
    )
    rows = [dict(r.content.metric_records["metrics"]) for r in good if "metrics" in r.content]
    return weighted_metrics(rows), failures


def run_message_api(grid: AuditingGrid, cfg: FederationConfig, writer: RoundWriter, base: ConfigRecord) -> None:
    """All rounds on the Message API, then the optional personalisation phase."""
    model = build_model(cfg.task, base_channels=cfg.base_channels, seed=cfg.seed)
    keys = shared_keys(model, fedbn=cfg.fedbn, local_statistics=cfg.local_bn_statistics)
    arrays = _record_of(get_arrays(model, keys))
    strategy: fs.Strategy | None = None
    nodes = wait_for_nodes(grid, minimum=cfg.min_available_clients, timeout_s=cfg.wait_for_nodes_s)
    sites, pending = roll_call(grid, nodes, timeout_s=cfg.wait_for_nodes_s)
    for rnd in range(1, cfg.num_rounds + 1):
        t0 = time.perf_counter()
        down0, up0, adown0, aup0 = grid.bytes_down, grid.bytes_up, grid.array_bytes_down, grid.array_bytes_up
        nodes = _wait_for_free_nodes(grid, cfg, sites)
        failures = [*pending, *_busy_failures(grid, sites, rnd)]
        pending = []
        if strategy is None:
            strategy = make_strategy(
                cfg, num_sampled=max(cfg.min_available_clients, int(len(nodes) * cfg.fraction_train))
            )
        config = ConfigRecord(dict(base))
        config[ROUND] = rnd
        messages = list(strategy.configure_train(rnd, arrays, config, grid))
        replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout_s, what=f"round-{rnd} train"))
        answered, train_failures = sort_replies(
            messages, replies, phase="train", server_round=rnd, sites=sites, timeout_s=cfg.round_timeout_s
        )
        failures += train_failures
        reference = _arrays_of(arrays)
        ok: list[Message] = []
        losses: list[dict[str, Any]] = []
        for reply in answered:
            node = int(reply.metadata.src_node_id)
            try:
                decoded = screen_update(reply, reference)
            except InvalidInputError as exc:
                rejected = SiteFailure(
                    site=_site_of(sites, node),
                    node_id=node,
                    phase="train",
                    reason=FailureReason.REJECTED,
                    detail=str(exc)[-500:],
                )
                log_failure(rejected, rnd)
                failures.append(rejected)
                continue
            metrics = reply.content["metrics"] if "metrics" in reply.content else MetricRecord({})
            reply.content = RecordDict({"arrays": _record_of(decoded), "metrics": metrics})
            losses.append(dict(metrics))
            ok.append(reply)
        aggregated = False
        if len(ok) >= cfg.min_available_clients:
            new_arrays, _ = strategy.aggregate_train(rnd, ok)
            if new_arrays is not None:
                arrays, aggregated = new_arrays, True
        else:
            LOG.warning(
                "round %d: %d usable updates < %d (%s); global model unchanged",
                rnd,
                len(ok),
                cfg.min_available_clients,
                describe_failures(failures) or "too few nodes sampled",
            )
        # Evaluate on the nodes that answered this round: a node that timed out or crashed would make the
        # evaluation wait for the full timeout again.
        evals, eval_failures = _evaluate_round(
            grid,
            sorted(int(r.metadata.src_node_id) for r in answered),
            arrays,
            base,
            server_round=rnd,
            sites=sites,
            timeout=cfg.round_timeout_s,
        )
        model_dir = writer.save_model(rnd, _arrays_of(arrays)) if aggregated else None
        train_m = weighted_metrics(losses)
        writer.write(
            RoundRecord(
                run_id=writer.run_id,
                round=rnd,
                nodes_sampled=len(messages),
                replies_ok=len(ok),
                replies_failed=len(train_failures),
                replies_rejected=sum(f.reason is FailureReason.REJECTED for f in failures),
                aggregated=aggregated,
                train_loss=train_m.get("train_loss"),
                eval_loss=evals.get("loss"),
                eval_auc=evals.get("auc"),
                eval_accuracy=evals.get("accuracy"),
                eval_dice=evals.get("dice"),
                bytes_down=grid.bytes_down - down0,
                bytes_up=grid.bytes_up - up0,
                array_bytes_down=grid.array_bytes_down - adown0,
                array_bytes_up=grid.array_bytes_up - aup0,
                seconds=time.perf_counter() - t0,
                model_dir=model_dir,
                failures=(*failures, *eval_failures),
            )
        )
    if cfg.personalisation_epochs > 0:
        personalise(grid, cfg, writer, arrays, base, sites=sites)


def _wait_for_free_nodes(grid: AuditingGrid, cfg: FederationConfig, sites: Mapping[int, str]) -> list[int]:
    """:func:`wait_for_nodes` over the nodes that are not busy; the error names the busy sites."""
    try:
        return wait_for_nodes(grid, minimum=cfg.min_available_clients, timeout_s=cfg.wait_for_nodes_s)
    except NotEnoughNodesError as exc:
        busy = ", ".join(f"{_site_of(sites, n)} (no reply to its {what})" for n, what in grid.busy_nodes().items())
        raise NotEnoughNodesError(f"{exc}; busy: {busy}" if busy else str(exc)) from None


def _busy_failures(grid: AuditingGrid, sites: Mapping[int, str], server_round: int) -> list[SiteFailure]:
    """One TIMEOUT failure per busy node: it is left out of this round."""
    out = [
        SiteFailure(
            site=_site_of(sites, node),
            node_id=node,
            phase="train",
            reason=FailureReason.TIMEOUT,
            detail=f"not asked: its {what} message is still unanswered",
        )
        for node, what in grid.busy_nodes().items()
    ]
    for f in out:
        log_failure(f, server_round)
    return out


def describe_failures(failures: Sequence[SiteFailure]) -> str:
    """``"C: timeout, D: error"``: the sites that failed and why, in one phrase."""
    return ", ".join(f"{f.site}: {f.reason.value}" for f in failures)


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
    grid: AuditingGrid, context: Context, cfg: FederationConfig, writer: RoundWriter, base: ConfigRecord
) -> None:
    """All rounds with SecAgg+: ``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow)`` over a legacy strategy."""
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server import strategy as ls
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    model = build_model(cfg.task, base_channels=cfg.base_channels, seed=cfg.seed)
    keys = shared_keys(model, fedbn=cfg.fedbn, local_statistics=cfg.local_bn_statistics)
    initial = ndarrays_to_parameters(list(get_arrays(model, keys).values()))
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
                    site=_site_of(sites, node) if node else "unknown",
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
        "on_evaluate_config_fn": lambda _r: dict(base),
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
@app.main()
def main(grid: Grid, context: Context) -> None:
    """Parse the run config, then run the rounds (Message API, or SecAgg+'s legacy workflow)."""
    cfg = FederationConfig.from_run_config(context.run_config)
    model = build_model(cfg.task, base_channels=cfg.base_channels, seed=cfg.seed)
    keys = shared_keys(model, fedbn=cfg.fedbn, local_statistics=cfg.local_bn_statistics)
    signature = model_signature(model, keys)
    writer = RoundWriter(cfg, context.run_config, context.run_id, signature)
    audited = AuditingGrid(grid, audit_path=str(context.run_config.get("audit_path", "")))
    base = ConfigRecord({CONFIG_HASH: cfg.config_hash(), SIGNATURE: signature})
    try:
        if cfg.secagg:
            run_secagg(audited, context, cfg, writer, base)
        else:
            run_message_api(audited, cfg, writer, base)
    except Exception as exc:
        writer.finish(exc)
        raise
    writer.finish(None)
