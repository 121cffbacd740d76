"""The model registry: every trained global model with its card, and which one is promoted.

Layout under ``<data_root>/models/registry/`` (a local folder or any fsspec URL)::

    <version>/weights.bin     the shared arrays, canonical serialisation (:func:`serialize_arrays`)
    <version>/card.json       :class:`~schemas.registry.ModelCard`, written after the weights, never changed
    <version>/decision.json   the promotion gate's :class:`~schemas.registry.Decision`
    current.json              :class:`~schemas.registry.CurrentPointer`, replaced atomically

``version`` is the first 16 hex digits of the weights' sha256. The serialisation is a pure function of the arrays
(names sorted, float32 little-endian), so a site that received the global arrays computes the same sha256 without
the file, and keys its own BatchNorm statistics or personalised layers by it (tasks/diagnose/site_models.py).

Integrity: promotion, rollback and every load check that the entry's files exist and that the weights' sha256 is
the card's; a refused entry leaves the pointer as it was. The pointer is one object written whole: a local file is
written beside and renamed into place, an object store's single PUT replaces it whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import fsspec
import numpy as np
import numpy.typing as npt
from fsspec.implementations.local import LocalFileSystem
from pydantic import ValidationError

from schemas.federation import FederatedTask
from schemas.registry import CurrentPointer, Decision, ModelCard, Outcome
from tasks.errors import CorruptStoreError, FedscanError, InvalidInputError
from tasks.extras import MissingExtraError, require_store_protocol

__all__ = [
    "ModelIntegrityError",
    "ModelNotFoundError",
    "ModelRegistry",
    "decide",
    "deserialize_arrays",
    "log_to_mlflow",
    "new_training_data",
    "publish_decision",
    "registry_uri",
    "serialize_arrays",
    "training_inventory",
    "weights_sha256",
]

LOG = logging.getLogger("fedscan.registry")
WEIGHTS = "weights.bin"
CARD = "card.json"
DECISION = "decision.json"
CURRENT = "current.json"
_MAGIC = b"FEDSCAN-WEIGHTS-1\n"

Arrays = Mapping[str, npt.ArrayLike]


class ModelNotFoundError(FedscanError, FileNotFoundError):
    """No such model in the registry, or one of its files is missing."""


class ModelIntegrityError(CorruptStoreError):
    """A registry entry whose weights do not match its card's sha256, or whose card does not parse."""


# ------------------------------------------------------------------------------------------------
# Weights: a canonical byte form
# ------------------------------------------------------------------------------------------------
def serialize_arrays(arrays: Arrays) -> bytes:
    """The arrays as bytes: a magic line, an 8-byte header length, a JSON header (name, shape, offset per array,
    names sorted) and the float32 little-endian data. A pure function of names, shapes and values."""
    names = sorted(arrays)
    header: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    offset = 0
    for name in names:
        a = np.ascontiguousarray(np.asarray(arrays[name]), dtype="<f4")
        blob = a.tobytes()
        header.append({"name": name, "shape": list(a.shape), "offset": offset, "nbytes": len(blob)})
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return _MAGIC + len(head).to_bytes(8, "little") + head + b"".join(blobs)


def deserialize_arrays(raw: bytes, *, where: str = "weights") -> dict[str, npt.NDArray[np.float32]]:
    """Inverse of :func:`serialize_arrays`; a file of another format is refused naming ``where``."""
    if not raw.startswith(_MAGIC) or len(raw) < len(_MAGIC) + 8:
        raise ModelIntegrityError(f"{where} is not a fedscan weights file")
    start = len(_MAGIC) + 8
    size = int.from_bytes(raw[len(_MAGIC) : start], "little")
    try:
        header = json.loads(raw[start : start + size])
    except ValueError as exc:
        raise ModelIntegrityError(f"{where}: the weights header does not parse") from exc
    body = memoryview(raw)[start + size :]
    out: dict[str, npt.NDArray[np.float32]] = {}
    for entry in header:
        lo, n = int(entry["offset"]), int(entry["nbytes"])
        if lo + n > len(body):
            raise ModelIntegrityError(f"{where} is truncated (array {entry['name']!r})")
        out[str(entry["name"])] = np.frombuffer(body[lo : lo + n], dtype="<f4").reshape(entry["shape"]).copy()
    return out


def weights_sha256(arrays: Arrays) -> str:
    """sha256 of :func:`serialize_arrays` (the model's identity; its first 16 digits are its version)."""
    return hashlib.sha256(serialize_arrays(arrays)).hexdigest()


def registry_uri(data_root: str) -> str:
    """Where a data root's registry lives."""
    return f"{str(data_root).rstrip('/')}/models/registry"


# ------------------------------------------------------------------------------------------------
# The registry
# ------------------------------------------------------------------------------------------------
class ModelRegistry:
    """The registry at ``uri`` (a folder or an fsspec URL); created on first write."""

    def __init__(self, uri: str) -> None:
        require_store_protocol(uri)
        self.uri = str(uri).rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.uri)

    @classmethod
    def for_data_root(cls, data_root: str) -> ModelRegistry:
        return cls(registry_uri(data_root))

    def __repr__(self) -> str:
        return f"ModelRegistry({self.uri!r})"

    # ---- paths and raw io ---------------------------------------------------------------------
    def _path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def _read(self, *parts: str) -> bytes:
        try:
            data: bytes = self.fs.cat_file(self._path(*parts))
        except FileNotFoundError as exc:
            raise ModelNotFoundError(f"registry {self.uri}: {'/'.join(parts)} is missing") from exc
        return data

    def _write(self, data: bytes, *parts: str) -> None:
        """One file written whole: beside and renamed on a local disk, one PUT elsewhere."""
        path = self._path(*parts)
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        if isinstance(self.fs, LocalFileSystem):
            tmp = f"{path}.tmp-{hashlib.sha256(data).hexdigest()[:8]}"
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, path)
        else:
            self.fs.pipe_file(path, data)

    # ---- entries ----------------------------------------------------------------------------
    def versions(self) -> list[str]:
        """Every registered version (a folder with a card), oldest first by card time."""
        if not self.fs.exists(self.root):
            return []
        found = []
        for entry in self.fs.ls(self.root, detail=False):
            name = str(entry).rstrip("/").rsplit("/", 1)[-1]
            if len(name) == 16 and self.fs.exists(self._path(name, CARD)):
                found.append(name)
        stamps = {v: (c.created_at.isoformat() if (c := self._card_or_none(v)) is not None else "") for v in found}
        return sorted(found, key=lambda v: (stamps[v], v))

    def _card_or_none(self, version: str) -> ModelCard | None:
        with contextlib.suppress(FedscanError):
            return self.card(version)
        return None

    def card(self, version: str) -> ModelCard:
        """The card of ``version`` (a prefix of at least 6 digits is enough when it is unique)."""
        version = self.resolve(version)
        raw = self._read(version, CARD)
        try:
            return ModelCard.model_validate_json(raw)
        except ValidationError as exc:
            raise ModelIntegrityError(f"registry {self.uri}: the card of {version} does not parse: {exc}") from exc

    def decision(self, version: str) -> Decision | None:
        with contextlib.suppress(ModelNotFoundError):
            return Decision.model_validate_json(self._read(self.resolve(version), DECISION))
        return None

    def resolve(self, version: str) -> str:
        """The full 16-digit version a prefix names."""
        if len(version) == 16:
            return version
        if len(version) < 6 or not all(c in "0123456789abcdef" for c in version):
            raise InvalidInputError(f"{version!r} is not a model version (16 hex digits, or a unique prefix of 6+)")
        hits = [v for v in self.versions() if v.startswith(version)]
        if len(hits) != 1:
            raise ModelNotFoundError(f"registry {self.uri}: {len(hits)} models match {version!r}")
        return hits[0]

    def register(self, card: ModelCard, arrays: Arrays) -> ModelCard:
        """Write the weights, then the card (an entry counts once its card exists). The card's sha256 must be
        the arrays' own; registering the same model again is a no-op."""
        raw = serialize_arrays(arrays)
        sha = hashlib.sha256(raw).hexdigest()
        if sha != card.sha256:
            raise InvalidInputError(f"card sha256 {card.sha256[:16]} is not the weights' {sha[:16]}")
        if self.fs.exists(self._path(card.version, CARD)):
            return self.card(card.version)
        self._write(raw, card.version, WEIGHTS)
        self._write(card.model_dump_json(indent=2).encode(), card.version, CARD)
        return card

    def load(self, version: str) -> tuple[ModelCard, dict[str, npt.NDArray[np.float32]]]:
        """The card and weights of ``version``, checked.

        Raises
        ------
        ModelNotFoundError
            The entry or one of its files is missing.
        ModelIntegrityError
            The weights' sha256 differs from the card's, or the card does not parse.
        """
        card = self.card(version)
        raw = self._read(card.version, WEIGHTS)
        sha = hashlib.sha256(raw).hexdigest()
        if sha != card.sha256:
            raise ModelIntegrityError(
                f"registry {self.uri}: model {card.version}'s weights have sha256 {sha[:16]}…, its card says "
                f"{card.sha256[:16]}… (changed or damaged)"
            )
        return card, deserialize_arrays(raw, where=f"{self.uri}/{card.version}/{WEIGHTS}")

    # ---- the pointer ------------------------------------------------------------------------
    def pointer(self) -> CurrentPointer | None:
        try:
            raw = self._read(CURRENT)
        except ModelNotFoundError:
            return None
        try:
            return CurrentPointer.model_validate_json(raw)
        except ValidationError as exc:
            raise ModelIntegrityError(f"registry {self.uri}: {CURRENT} does not parse") from exc

    def current(self) -> ModelCard | None:
        """The promoted model's card (not checked: :meth:`load` it to use it), None before any promotion."""
        pointer = self.pointer()
        return None if pointer is None else self.card(pointer.version)

    def _set_current(self, card: ModelCard, history: Sequence[str]) -> None:
        pointer = CurrentPointer(
            version=card.version, sha256=card.sha256, history=tuple(history), updated_at=datetime.now(UTC)
        )
        self._write(pointer.model_dump_json(indent=2).encode(), CURRENT)

    def promote(self, version: str, *, reason: str = "promoted by hand") -> Decision:
        """Make ``version`` current after checking its files (a refused entry leaves the pointer as it was)."""
        card, _ = self.load(version)
        pointer = self.pointer()
        if pointer is not None and pointer.version == card.version:
            return self._decided(card, Outcome.PROMOTED, "already current", pointer, None, 0.0)
        previous = None if pointer is None else self._card_or_none(pointer.version)
        history = () if pointer is None else (*pointer.history, pointer.version)
        self._set_current(card, history)
        return self._decided(card, Outcome.PROMOTED, reason, pointer, previous, 0.0)

    def rollback(self) -> Decision:
        """Make the previously current model current again (checked first); refused when there is none."""
        pointer = self.pointer()
        if pointer is None or not pointer.history:
            raise InvalidInputError(f"registry {self.uri}: no earlier model to roll back to")
        target = pointer.history[-1]
        card, _ = self.load(target)
        self._set_current(card, pointer.history[:-1])
        return Decision(
            version=card.version,
            outcome=Outcome.PROMOTED,
            reason=f"rolled back from {pointer.version}",
            value=card.metric_value,
            current_version=pointer.version,
            decided_at=datetime.now(UTC),
        )

    def gate(self, card: ModelCard, *, margin: float) -> Decision:
        """The promotion gate for a registered model: :func:`decide` against the current one; promoted when it
        passes (files checked). The decision is stored beside the entry."""
        pointer = self.pointer()
        current = None if pointer is None else self._card_or_none(pointer.version)
        decision = decide(card, current, margin=margin)
        if decision.outcome is Outcome.PROMOTED:
            self.load(card.version)  # refuses missing files or a checksum mismatch before the pointer moves
            history = () if pointer is None else (*pointer.history, pointer.version)
            self._set_current(card, history)
        self._write(decision.model_dump_json(indent=2).encode(), card.version, DECISION)
        return decision

    def _decided(
        self,
        card: ModelCard,
        outcome: Outcome,
        reason: str,
        pointer: CurrentPointer | None,
        previous: ModelCard | None,
        margin: float,
    ) -> Decision:
        decision = Decision(
            version=card.version,
            outcome=outcome,
            reason=reason,
            metric=card.metric,
            value=card.metric_value,
            current_version=None if pointer is None else pointer.version,
            current_value=None if previous is None else previous.metric_value,
            margin=margin,
            decided_at=datetime.now(UTC),
        )
        self._write(decision.model_dump_json(indent=2).encode(), card.version, DECISION)
        return decision


def decide(card: ModelCard, current: ModelCard | None, *, margin: float) -> Decision:
    """The promotion rule: a diverged model (NaN loss or metric) fails; a model whose aggregated metric is worse
    than the current one's by more than ``margin`` is kept, not promoted; any other is promoted."""
    if margin < 0 or not math.isfinite(margin):
        raise InvalidInputError(f"margin must be finite and >= 0, got {margin}")
    now = datetime.now(UTC)
    base = {
        "version": card.version,
        "metric": card.metric,
        "value": card.metric_value,
        "current_version": None if current is None else current.version,
        "current_value": None if current is None else current.metric_value,
        "margin": margin,
        "decided_at": now,
    }
    if card.diverged:
        reason = f"diverged: {card.metric}={card.metric_value}, train loss={card.train_loss}; never promoted"
        return Decision(outcome=Outcome.FAILED, reason=reason, **base)
    assert card.metric_value is not None
    if current is None:
        return Decision(outcome=Outcome.PROMOTED, reason="first model", **base)
    if current.metric_value is None or not math.isfinite(current.metric_value):
        return Decision(outcome=Outcome.PROMOTED, reason="the current model has no valid metric", **base)
    if card.metric_value < current.metric_value - margin:
        reason = (
            f"{card.metric} {card.metric_value:.4f} is worse than the current {current.version}'s "
            f"{current.metric_value:.4f} by more than the margin {margin}; kept, not promoted"
        )
        return Decision(outcome=Outcome.KEPT, reason=reason, **base)
    reason = f"{card.metric} {card.metric_value:.4f} vs current {current.metric_value:.4f} (margin {margin})"
    return Decision(outcome=Outcome.PROMOTED, reason=reason, **base)


# ------------------------------------------------------------------------------------------------
# What a model was trained on
# ------------------------------------------------------------------------------------------------
def training_inventory(site_stores: Iterable[str], *, task: FederatedTask | str) -> dict[str, dict[str, str]]:
    """site → scan id → a digest (16 hex) of the scan's targets, for every scan a ClientApp would train on (the
    reader's own rule: a completed surrogate stage and targets for the task). Targets are read, never images."""
    from tasks.federated.data import LABELS_ARRAY, MASKS_ARRAY, unusable_reason
    from tasks.storage import SiteStore

    target = LABELS_ARRAY if FederatedTask(task) is FederatedTask.CLASSIFY else MASKS_ARRAY
    out: dict[str, dict[str, str]] = {}
    for uri in site_stores:
        site = SiteStore.open(uri, mode="r")
        scans: dict[str, str] = {}
        for scan in site.scans():
            if unusable_reason(scan, target):
                continue
            y = np.ascontiguousarray(np.asarray(scan.array(target)[...]) > 0, dtype=np.uint8)
            h = hashlib.sha256(f"{y.shape}".encode())
            h.update(y.tobytes())
            scans[scan.scan_id] = h.hexdigest()[:16]
        out[site.site_id] = scans
    return out


def new_training_data(card: ModelCard | None, inventory: Mapping[str, Mapping[str, str]]) -> list[str]:
    """``site/scan`` entries of ``inventory`` the model was not trained on: new scans, and scans whose labels
    changed. A scan whose labels arrived again unchanged is not new (each scan counts once)."""
    seen = {} if card is None else card.training_data
    return [
        f"{site}/{scan}"
        for site, scans in sorted(inventory.items())
        for scan, digest in sorted(scans.items())
        if seen.get(site, {}).get(scan) != digest
    ]


# ------------------------------------------------------------------------------------------------
# Telling the world
# ------------------------------------------------------------------------------------------------
def publish_decision(decision: Decision, card: ModelCard) -> None:
    """A Prefect event ``fedscan.model.<outcome>`` and a markdown artifact with the card (inside a run only)."""
    from tasks.artifacts import in_prefect_run

    if not in_prefect_run():
        return
    from prefect.artifacts import create_markdown_artifact
    from prefect.events import emit_event

    payload = decision.model_dump(mode="json")
    emit_event(
        event=f"fedscan.model.{decision.outcome.value}",
        resource={"prefect.resource.id": f"fedscan.model.{card.version}", "prefect.resource.name": card.version},
        payload=payload,
    )
    rows = "\n".join(
        f"| {s.site_id} | {s.labelled_scans} | "
        + ", ".join(f"{k}={v:.4f}" for k, v in sorted(s.validation.items()))
        + " |"
        for s in card.sites
    )
    eps = card.privacy.epsilon
    markdown = (
        f"## Model {card.version}: {decision.outcome.value}\n\n{decision.reason}\n\n"
        f"- task {card.task.value}, input {card.input_size[0]}x{card.input_size[1]}, {card.architecture} "
        f"(base {card.base_channels})\n- {card.rounds} rounds of {card.strategy}; warm start: {card.warm_start} "
        f"(parent {card.parent}); local fine-tuning epochs: {card.local_finetune_epochs}\n"
        f"- SecAgg+: {card.privacy.secagg}; DP: {card.privacy.dp_mode}"
        + (f", ε = {eps:.3g}" if eps is not None else "")
        + f"\n- {card.metric} over the sites: {card.metric_value}\n- code {card.code_version}\n\n"
        "| site | labelled scans | validation (at the site) |\n|---|---|---|\n" + rows + "\n"
    )
    create_markdown_artifact(markdown=markdown, key="fedscan-model-decision", description=decision.reason[:200])


def log_to_mlflow(card: ModelCard, weights: bytes, *, tracking_uri: str) -> str:
    """Log the card (params, metrics) and the weights to MLflow, registered as ``fedscan-<task>``; returns the
    MLflow run id. MLflow is an optional extra: without it this is one line naming the extra."""
    try:
        import mlflow
    except ImportError as exc:
        raise MissingExtraError(
            "FEDSCAN_MLFLOW__TRACKING_URI is set but mlflow is not installed (pip install 'fedscan[mlflow]')"
        ) from exc
    import tempfile
    from pathlib import Path

    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_name=f"fedscan-{card.version}") as run, tempfile.TemporaryDirectory() as tmp:
        mlflow.log_params(
            {"task": card.task.value, "strategy": card.strategy, "rounds": card.rounds, "parent": card.parent or ""}
        )
        if card.metric_value is not None and math.isfinite(card.metric_value):
            mlflow.log_metric(card.metric, card.metric_value)
        Path(tmp, WEIGHTS).write_bytes(weights)
        Path(tmp, CARD).write_text(card.model_dump_json(indent=2), encoding="utf-8")
        mlflow.log_artifacts(tmp, artifact_path="model")
        with contextlib.suppress(Exception):  # a tracking server without a model registry still keeps the run
            mlflow.register_model(f"runs:/{run.info.run_id}/model", f"fedscan-{card.task.value}")
        return str(run.info.run_id)
