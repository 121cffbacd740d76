"""What the server does with each round's replies: name the sites that fail, screen updates, record rounds.

:class:`ScreeningStrategy` wraps any Flower strategy so that Flower's ``Strategy.start`` runs the rounds while
fedscan keeps its side of each round; :class:`RoundWriter` writes the round records, the global models and the
ServerApp's outcome. A failure of a site is one :class:`~schemas.federation.SiteFailure`: named by the site id
its node gave at the roll call (:func:`roll_call`), logged at WARNING and kept in the round's record.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid
from flwr.serverapp import strategy as fs

from schemas.federation import (
    CompressionKind,
    FailurePhase,
    FailureReason,
    FederationConfig,
    RoundRecord,
    ServerOutcome,
    SiteFailure,
)
from tasks.errors import FedscanError, InvalidInputError
from tasks.federated.client_app import COMPRESSION_RECORD, ROLL_CALL, ROUND, SITE_KEY, SITE_RECORD
from tasks.federated.compression import decode_update
from tasks.federated.grid import AuditingGrid, NotEnoughNodesError, wait_for_nodes

LOG = logging.getLogger("fedscan.federated.server")


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
# Replies and failures
# ------------------------------------------------------------------------------------------------
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


def arrays_of(record: ArrayRecord) -> dict[str, npt.NDArray[np.float32]]:
    return {k: np.asarray(v.numpy(), dtype=np.float32) for k, v in record.items()}


def record_of(arrays: Mapping[str, npt.NDArray[np.float32]]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def site_of(sites: Mapping[int, str], node: int) -> str:
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
    at WARNING with the site's name and reason.

    A reply belongs to the node its message was sent to: the SuperLink answers for a node it has lost ("Node
    Unavailable") with its own id as the source."""
    to_node = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in sent if m.metadata.message_id}

    def node_of(reply: Message) -> int:
        return to_node.get(reply.metadata.reply_to_message_id, int(reply.metadata.src_node_id))

    answered = {node_of(r) for r in replies}
    failures = [
        SiteFailure(
            site=site_of(sites, int(m.metadata.dst_node_id)),
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
            node = node_of(r)
            failures.append(
                SiteFailure(
                    site=site_of(sites, node),
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


def log_failure(failure: SiteFailure, server_round: int, *, logger: logging.Logger = LOG) -> None:
    """One WARNING line naming the site, what it missed and why."""
    logger.warning(
        "site %s (node %d) dropped from round %d (%s): %s: %s",
        failure.site,
        failure.node_id,
        server_round,
        failure.phase,
        failure.reason.value,
        failure.detail,
    )


def roll_call(
    grid: AuditingGrid, nodes: Sequence[int], *, timeout_s: float
) -> tuple[dict[int, str], list[SiteFailure]]:
    """Ask every node for its site id (``query.site``), so that a site that later hangs or fails is named.

    The first message a node gets also pays its start-up (a cold ClientApp process or Ray actor importing torch),
    so callers give the roll call the time they allow nodes to connect, not the round timeout."""
    msgs = [Message(RecordDict(), dst_node_id=n, message_type=ROLL_CALL) for n in nodes]
    replies = list(grid.send_and_receive(msgs, timeout=timeout_s, what="roll call"))
    good, failures = sort_replies(msgs, replies, phase="roll-call", server_round=0, sites={}, timeout_s=timeout_s)
    sites: dict[int, str] = {}
    for r in good:
        if SITE_RECORD in r.content.config_records:
            sites[int(r.metadata.src_node_id)] = str(r.content.config_records[SITE_RECORD][SITE_KEY])
    return sites, failures


@dataclass
class _Round:
    """What one round has done so far (between ``configure_train`` and ``aggregate_evaluate``)."""

    t0: float
    counters: tuple[int, int, int, int]
    sent: list[Message]
    reference: dict[str, npt.NDArray[np.float32]]
    failures: list[SiteFailure]
    train_failed: int = 0
    answered: list[int] = field(default_factory=list)
    ok: int = 0
    aggregated: bool = False
    train_loss: float | None = None
    eval_sent: list[Message] = field(default_factory=list)


class ScreeningStrategy(fs.Strategy):
    """fedscan's side of a round, around any Flower strategy whose :meth:`start` runs the rounds.

    Before each round it waits for enough free nodes (:class:`AuditingGrid` leaves busy ones out), asks nodes
    it has not seen yet for their site id (:func:`roll_call`) and records the busy sites; it decodes and screens
    every update (:func:`screen_update`) and names each site that timed out, failed or was rejected; the
    wrapped strategy aggregates only when ``min_available_clients`` updates passed; the evaluation goes to the
    nodes that answered the round (a node that timed out would make it wait the full timeout again); and it
    writes one :class:`RoundRecord` and the global model per round.
    """

    def __init__(
        self,
        inner: fs.Strategy,
        *,
        grid: AuditingGrid,
        cfg: FederationConfig,
        writer: RoundWriter,
    ) -> None:
        self.inner = inner
        self.grid = grid
        self.cfg = cfg
        self.writer = writer
        #: node id -> site id, from the roll calls; and every node a roll call went to
        self.sites: dict[int, str] = {}
        self.asked: set[int] = set()
        self.arrays: ArrayRecord | None = None
        self._round: _Round | None = None

    def summary(self) -> None:
        self.inner.summary()

    def _roll_call_newcomers(self) -> list[SiteFailure]:
        """Roll call of the nodes never asked yet (all of them before round 1; a restarted site's new node
        later), so that their failures are named by site."""
        new = [n for n in self.grid.get_node_ids() if n not in self.asked]
        if not new:
            return []
        self.asked.update(new)
        names, failures = roll_call(self.grid, new, timeout_s=self.cfg.wait_for_nodes_s)
        self.sites.update(names)
        return failures

    def _state(self) -> _Round:
        if self._round is None:  # pragma: no cover - Flower's start always configures a round first
            raise FedscanError("a round was aggregated before it was configured")
        return self._round

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        g = self.grid
        counters = (g.bytes_down, g.bytes_up, g.array_bytes_down, g.array_bytes_up)
        t0 = time.perf_counter()
        wait_for_free_nodes(g, self.cfg, self.sites)
        failures = self._roll_call_newcomers()
        failures += busy_failures(g, self.sites, server_round)
        self.arrays = arrays
        g.server_round = server_round
        config = ConfigRecord({**dict(config), ROUND: server_round})
        sent = list(self.inner.configure_train(server_round, arrays, config, grid))
        self._round = _Round(t0, counters, sent, arrays_of(arrays), failures)
        return sent

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        st = self._state()
        timeout = self.cfg.round_timeout_s
        answered, train_failures = sort_replies(
            st.sent, list(replies), phase="train", server_round=server_round, sites=self.sites, timeout_s=timeout
        )
        st.failures += train_failures
        st.train_failed = len(train_failures)
        st.answered = sorted(int(r.metadata.src_node_id) for r in answered)
        ok: list[Message] = []
        losses: list[dict[str, Any]] = []
        for reply in answered:
            node = int(reply.metadata.src_node_id)
            try:
                decoded = screen_update(reply, st.reference)
            except InvalidInputError as exc:
                rejected = SiteFailure(
                    site=site_of(self.sites, node),
                    node_id=node,
                    phase="train",
                    reason=FailureReason.REJECTED,
                    detail=str(exc)[-500:],
                )
                log_failure(rejected, server_round)
                st.failures.append(rejected)
                continue
            reply_metrics = reply.content["metrics"] if "metrics" in reply.content else MetricRecord({})
            reply.content = RecordDict({"arrays": record_of(decoded), "metrics": reply_metrics})
            losses.append(dict(reply_metrics))
            ok.append(reply)
        st.ok = len(ok)
        st.train_loss = weighted_metrics(losses).get("train_loss")
        if len(ok) < self.cfg.min_available_clients:
            LOG.warning(
                "round %d: %d usable updates < %d (%s); global model unchanged",
                server_round,
                len(ok),
                self.cfg.min_available_clients,
                describe_sites(st.failures) or "too few nodes sampled",
            )
            return None, None
        new_arrays, metrics = self.inner.aggregate_train(server_round, ok)
        if new_arrays is not None:
            st.aggregated, self.arrays = True, new_arrays
        return new_arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        st = self._state()
        config = ConfigRecord({**dict(config), ROUND: server_round})  # the site saves its state after the last
        st.eval_sent = [
            Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=n, message_type=MessageType.EVALUATE)
            for n in st.answered
        ]
        return st.eval_sent

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        st = self._state()
        good, eval_failures = sort_replies(
            st.eval_sent,
            list(replies),
            phase="evaluate",
            server_round=server_round,
            sites=self.sites,
            timeout_s=self.cfg.round_timeout_s,
        )
        evals = weighted_metrics([dict(r.content.metric_records["metrics"]) for r in good if "metrics" in r.content])
        per_site = {
            site_of(self.sites, int(r.metadata.src_node_id)): {
                k: float(v) for k, v in r.content.metric_records["metrics"].items() if isinstance(v, int | float)
            }
            for r in good
            if "metrics" in r.content
        }
        model_dir = None
        if st.aggregated and self.arrays is not None:
            model_dir = self.writer.save_model(server_round, arrays_of(self.arrays))
        g = self.grid
        down0, up0, adown0, aup0 = st.counters
        self.writer.write(
            RoundRecord(
                run_id=self.writer.run_id,
                round=server_round,
                nodes_sampled=len(st.sent),
                replies_ok=st.ok,
                replies_failed=st.train_failed,
                replies_rejected=sum(f.reason is FailureReason.REJECTED for f in st.failures),
                aggregated=st.aggregated,
                train_loss=st.train_loss,
                eval_loss=evals.get("loss"),
                eval_auc=evals.get("auc"),
                eval_accuracy=evals.get("accuracy"),
                eval_dice=evals.get("dice"),
                eval_psnr_db=evals.get("psnr_db"),
                eval_ssim=evals.get("ssim"),
                bytes_down=g.bytes_down - down0,
                bytes_up=g.bytes_up - up0,
                array_bytes_down=g.array_bytes_down - adown0,
                array_bytes_up=g.array_bytes_up - aup0,
                seconds=time.perf_counter() - st.t0,
                model_dir=model_dir,
                failures=(*st.failures, *eval_failures),
                site_metrics=per_site,
            )
        )
        self._round = None
        out: dict[str, int | float | list[int] | list[float]] = dict(evals)
        return MetricRecord(out) if out else None


def wait_for_free_nodes(grid: AuditingGrid, cfg: FederationConfig, sites: Mapping[int, str]) -> list[int]:
    """:func:`wait_for_nodes` over the nodes that are not busy; the error names the busy sites."""
    try:
        return wait_for_nodes(grid, minimum=cfg.min_available_clients, timeout_s=cfg.wait_for_nodes_s)
    except NotEnoughNodesError as exc:
        busy = ", ".join(f"{site_of(sites, n)} (no reply to its {what})" for n, what in grid.busy_nodes().items())
        raise NotEnoughNodesError(f"{exc}; busy: {busy}" if busy else str(exc)) from None


def busy_failures(grid: AuditingGrid, sites: Mapping[int, str], server_round: int) -> list[SiteFailure]:
    """One TIMEOUT failure per busy node: it is left out of this round."""
    out = [
        SiteFailure(
            site=site_of(sites, node),
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


def describe_sites(failures: Sequence[SiteFailure]) -> str:
    """``"B (train: error), C (train: timeout; evaluate: timeout)"``: each failed site once, with its reasons."""
    by_site: dict[str, list[str]] = {}
    for f in failures:
        why = by_site.setdefault(f.site, [])
        if (entry := f"{f.phase}: {f.reason.value}") not in why:
            why.append(entry)
    return ", ".join(f"{site} ({'; '.join(why)})" for site, why in by_site.items())
