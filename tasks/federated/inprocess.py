"""The ServerApp's rounds against ClientApps in this process (benchmarks and tests).

:class:`InProcessGrid` is a Flower :class:`~flwr.serverapp.Grid` that hands each message straight to the
ClientApp of its node (real Flower messages, strategies, mods and workflows; no SuperLink, no processes, no
Ray). A ClientApp exception becomes an error reply, as in Flower's runtime. It measures the algorithms, not
Flower's transport: wall times exclude process start-up and networking.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from schemas.federation import FederationConfig, RoundRecord
from tasks.federated import client_app as ca
from tasks.federated import server_app as sa
from tasks.federated.grid import AuditingGrid
from tasks.federated.model import model_for, model_signature, shared_keys

#: ``tamper(reply) -> reply``: alters one node's replies (fault injection in tests).
Tamper = Callable[[Message], Message]


class InProcessGrid(Grid):
    """Delivers each message to the ClientApp of its node; ``down`` nodes are listed but never answer."""

    def __init__(
        self,
        stores: Sequence[str | Path],
        run_config: dict[str, Any],
        *,
        tamper: dict[int, Tamper] | None = None,
    ) -> None:
        self.contexts = {
            100 + i: Context(
                run_id=1,
                node_id=100 + i,
                node_config={ca.NODE_STORE_KEY: str(p)},
                state=RecordDict(),
                run_config=run_config,
            )
            for i, p in enumerate(stores)
        }
        self.tamper = tamper or {}
        self.down: set[int] = set()
        self.received: list[Message] = []
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0

    def set_run(self, run: Any) -> None:  # pragma: no cover - nothing to set up
        return None

    @property
    def run(self) -> Any:
        """A stand-in ``Run`` with the run id the legacy client manager reads."""
        from types import SimpleNamespace

        return SimpleNamespace(run_id=1)

    def create_message(self, *args: Any, **kwargs: Any) -> Message:  # pragma: no cover
        raise NotImplementedError("build Message objects directly")

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # pragma: no cover
        raise NotImplementedError("use send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Late replies: none (a ``down`` node never answers)."""
        return []

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for sent in messages:
            node = sent.metadata.dst_node_id
            sent.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as Flower's grids do on push
            if node in self.down:
                continue
            # Each node gets its own copy, as after serialisation (mods such as secaggplus_mod mutate records).
            msg = Message(copy.deepcopy(sent.content), dst_node_id=node, message_type=sent.metadata.message_type)
            msg.metadata.__dict__["_message_id"] = sent.metadata.message_id
            TaskIdentity.node_id = node
            try:
                reply = ca.app(msg, self.contexts[node])
            except Exception as exc:
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(exc)), reply_to=msg)
            if node in self.tamper and not reply.has_error():
                reply = self.tamper[node](reply)
            replies.append(reply)
        self.received.extend(replies)
        return replies


def run_in_process(
    cfg: FederationConfig,
    stores: Sequence[str | Path],
    out_dir: str | Path,
    *,
    tamper: dict[int, Tamper] | None = None,
    down: Iterable[int] = (),
) -> tuple[InProcessGrid, list[RoundRecord]]:
    """Run every round of ``cfg`` (SecAgg+ included) and return the grid and the round records."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rc = cfg.to_run_config(
        metrics_path=str(out / "metrics.jsonl"), models_dir=str(out / "models"), audit_path=str(out / "audit.jsonl")
    )
    grid = InProcessGrid(stores, rc, tamper=tamper)
    grid.down.update(down)
    model = model_for(cfg)
    signature = model_signature(model, shared_keys(model, fedbn=cfg.fedbn, local_statistics=cfg.local_bn_statistics))
    writer = sa.round_writer(cfg)(cfg, rc, 1, signature)
    audited = AuditingGrid(grid, audit_path=str(rc["audit_path"]))
    base = ConfigRecord({ca.CONFIG_HASH: cfg.config_hash(), ca.SIGNATURE: signature})
    try:  # as the ServerApp's main: the writer learns how the rounds ended
        if cfg.secagg:
            context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=rc)
            sa.run_secagg(audited, context, cfg, writer, base)
        else:
            sa.run_message_api(audited, cfg, writer, base)
    except Exception as exc:
        writer.finish(exc)
        raise
    writer.finish(None)
    path = out / "metrics.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    return grid, [RoundRecord.model_validate_json(x) for x in lines]
