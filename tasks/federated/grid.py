"""The server's view of the nodes: a Grid wrapper that audits and counts every message and keeps busy nodes out.

:class:`AuditingGrid` wraps the Grid Flower hands the ServerApp (in-memory in the Simulation Engine, HTTP to
the SuperLink in deployment, :class:`~tasks.federated.inprocess.InProcessGrid` in tests).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Message
from flwr.serverapp import Grid

from tasks.errors import FedscanError

LOG = logging.getLogger("fedscan.federated.server")


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
        #: node id -> (id of its unanswered message, what that message was: "round-2 train" etc.)
        self.busy: dict[int, tuple[str, str]] = {}
        #: The round in progress (labels busy messages).
        self.server_round = 0

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
                label = what or f"round-{self.server_round} {m.metadata.message_type}"
                self.busy[int(m.metadata.dst_node_id)] = (m.metadata.message_id, label)
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
