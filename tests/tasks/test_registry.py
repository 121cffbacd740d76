"""The model registry: cards, the promotion gate, rollback, and refusal of damaged entries."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from schemas.registry import ModelCard, Outcome, PrivacyCard, SiteCard
from tasks.errors import InvalidInputError
from tasks.registry import (
    ModelIntegrityError,
    ModelNotFoundError,
    ModelRegistry,
    decide,
    deserialize_arrays,
    new_training_data,
    serialize_arrays,
    training_inventory,
    weights_sha256,
)

_T0 = datetime(2026, 12, 1, tzinfo=UTC)


def _arrays(seed: int) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    return {"conv.weight": g.normal(size=(4, 1, 3, 3)).astype(np.float32), "head.bias": g.normal(size=(1,))}


def _card(arrays, *, auc: float | None, loss: float | None = 0.5, k: int = 0, **kw) -> ModelCard:
    fields = {
        "sha256": weights_sha256(arrays),
        "task": "classify",
        "input_size": (32, 32),
        "architecture": "LesionClassifier",
        "base_channels": 4,
        "fedbn": False,
        "local_bn_statistics": True,
        "sites": (SiteCard(site_id="A", labelled_scans=2, validation={"auc": auc or 0.0}),),
        "rounds": 2,
        "strategy": "fedavg",
        "privacy": PrivacyCard(secagg=False, dp_mode="off"),
        "metric_value": auc,
        "train_loss": loss,
        "code_version": "test",
        "created_at": _T0 + timedelta(minutes=k),
    }
    fields.update(kw)
    return ModelCard(**fields)


@pytest.fixture(params=["local", "memory"])
def registry(request, tmp_path):
    if request.param == "local":
        yield ModelRegistry(str(tmp_path / "models" / "registry"))
        return
    uri = f"memory://reg-{tmp_path.name}"
    yield ModelRegistry(uri)
    import fsspec

    fs = fsspec.filesystem("memory")
    if fs.exists(uri.split("://")[1]):
        fs.rm(uri.split("://")[1], recursive=True)


def _register(registry, seed, auc, **kw):
    arrays = _arrays(seed)
    return registry.register(_card(arrays, auc=auc, k=seed, **kw), arrays)


def test_weights_bytes_are_canonical_and_round_trip():
    a = _arrays(0)
    reordered = dict(reversed(list(a.items())))
    assert serialize_arrays(a) == serialize_arrays(reordered)
    back = deserialize_arrays(serialize_arrays(a))
    assert sorted(back) == sorted(a)
    for k in a:
        np.testing.assert_array_equal(back[k], a[k].astype(np.float32))
    changed = {**a, "head.bias": a["head.bias"] + 1e-3}
    assert weights_sha256(changed) != weights_sha256(a)
    with pytest.raises(ModelIntegrityError, match="not a fedscan weights file"):
        deserialize_arrays(b"PK\x03\x04 a zip")


def test_register_load_and_first_promotion(registry):
    assert registry.current() is None and registry.versions() == []
    card = _register(registry, 1, 0.8)
    assert registry.versions() == [card.version]
    loaded, arrays = registry.load(card.version[:8])  # a unique prefix names it
    assert loaded == card
    np.testing.assert_array_equal(arrays["conv.weight"], _arrays(1)["conv.weight"])
    decision = registry.gate(card, margin=0.01)
    assert decision.outcome is Outcome.PROMOTED and decision.current_version is None
    assert registry.current() == card
    assert registry.decision(card.version) == decision
    # registering the same weights again changes nothing
    assert _register(registry, 1, 0.8) == card and registry.versions() == [card.version]


def test_register_refuses_a_card_of_other_weights(registry):
    with pytest.raises(InvalidInputError, match="not the weights'"):
        registry.register(_card(_arrays(1), auc=0.8), _arrays(2))


@pytest.mark.parametrize(
    ("new_auc", "margin", "outcome"),
    [
        (0.85, 0.01, Outcome.PROMOTED),
        (0.795, 0.01, Outcome.PROMOTED),
        (0.78, 0.01, Outcome.KEPT),
        (0.78, 0.05, Outcome.PROMOTED),
    ],
)
def test_the_gate_promotes_unless_worse_by_more_than_the_margin(registry, new_auc, margin, outcome):
    first = _register(registry, 1, 0.80)
    registry.gate(first, margin=margin)
    second = _register(registry, 2, new_auc)
    decision = registry.gate(second, margin=margin)
    assert decision.outcome is outcome, decision.reason
    assert registry.current().version == (second.version if outcome is Outcome.PROMOTED else first.version)
    if outcome is Outcome.KEPT:
        assert "kept, not promoted" in decision.reason and second.version in registry.versions()


@pytest.mark.parametrize(("auc", "loss"), [(math.nan, 0.4), (None, 0.4), (0.9, math.nan)])
def test_a_diverged_model_is_never_promoted(registry, auc, loss):
    first = _register(registry, 1, 0.6)
    registry.gate(first, margin=0.0)
    bad = _register(registry, 2, auc, loss=loss)
    decision = registry.gate(bad, margin=1.0)
    assert decision.outcome is Outcome.FAILED and "diverged" in decision.reason
    assert registry.current().version == first.version
    # not even as the very first model
    assert decide(bad, None, margin=1.0).outcome is Outcome.FAILED


def test_rollback_returns_to_the_previous_model(registry):
    cards = [_register(registry, k, 0.7 + 0.05 * k) for k in (1, 2, 3)]
    for c in cards:
        registry.gate(c, margin=0.0)
    assert registry.pointer().history == (cards[0].version, cards[1].version)
    registry.rollback()
    assert registry.current().version == cards[1].version
    registry.rollback()
    assert registry.current().version == cards[0].version
    with pytest.raises(InvalidInputError, match="no earlier model"):
        registry.rollback()
    registry.promote(cards[2].version)  # by hand, whatever its metric
    assert registry.current().version == cards[2].version


def _damage(registry, version, how):
    path = f"{registry.root}/{version}/weights.bin"
    if how == "checksum":
        raw = bytearray(registry.fs.cat_file(path))
        raw[-1] ^= 0x01
        registry.fs.pipe_file(path, bytes(raw))
    else:
        registry.fs.rm(path)


@pytest.mark.parametrize(("how", "error"), [("checksum", ModelIntegrityError), ("missing", ModelNotFoundError)])
def test_a_damaged_entry_is_refused_and_the_previous_model_stays(registry, how, error):
    first = _register(registry, 1, 0.7)
    registry.gate(first, margin=0.0)
    second = _register(registry, 2, 0.9)
    _damage(registry, second.version, how)
    with pytest.raises(error, match=second.version):
        registry.gate(second, margin=0.0)
    with pytest.raises(error):
        registry.promote(second.version)
    assert registry.current().version == first.version
    # a damaged current model is refused when loaded, and rollback refuses a damaged target too
    third = _register(registry, 3, 0.95)
    registry.gate(third, margin=0.0)
    _damage(registry, first.version, how)
    pointer = registry.pointer()
    assert pointer.version == third.version and pointer.history[-1] == first.version
    with pytest.raises(error):
        registry.rollback()
    assert registry.current().version == third.version


def test_new_training_data_counts_each_scan_once():
    arrays = _arrays(1)
    card = _card(arrays, auc=0.8, training_data={"A": {"s1": "a" * 16, "s2": "b" * 16}})
    same = {"A": {"s1": "a" * 16, "s2": "b" * 16}}
    assert new_training_data(card, same) == []
    assert new_training_data(card, {"A": {"s1": "a" * 16, "s2": "c" * 16}}) == ["A/s2"]  # relabelled
    assert new_training_data(card, {**same, "B": {"s1": "a" * 16}}) == ["B/s1"]  # same scan id, other site
    assert new_training_data(None, same) == ["A/s1", "A/s2"]


def test_training_inventory_digests_the_labels_of_usable_scans(tmp_path, rng):
    from tasks.federated.data import write_site_surrogates

    def scan(k, labels):
        return (f"s{k}", rng.random((3, 8, 8), dtype=np.float32), labels, np.zeros((3, 8, 8), np.uint8))

    write_site_surrogates(tmp_path / "A.zarr", site_id="A", scans=[scan(1, [0, 1, 0]), scan(2, [1, 1, 0])])
    write_site_surrogates(tmp_path / "B.zarr", site_id="B", scans=[scan(1, [0, 1, 0])])
    inv = training_inventory([str(tmp_path / "A.zarr"), str(tmp_path / "B.zarr")], task="classify")
    assert sorted(inv) == ["A", "B"] and sorted(inv["A"]) == ["s1", "s2"]
    assert inv["A"]["s1"] == inv["B"]["s1"] != inv["A"]["s2"]  # the digest is of the labels only


def test_mlflow_without_its_extra_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    """FEDSCAN_MLFLOW__TRACKING_URI set but mlflow not importable: one line naming fedscan[mlflow]."""
    import builtins
    import sys

    from tasks.extras import MissingExtraError
    from tasks.registry import log_to_mlflow

    real_import = builtins.__import__

    def no_mlflow(name, *args, **kwargs):
        if name == "mlflow" or name.startswith("mlflow."):
            raise ModuleNotFoundError("No module named 'mlflow'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "mlflow", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    card = _card(_arrays(0), auc=0.7)
    with pytest.raises(MissingExtraError, match=r"fedscan\[mlflow\]") as err:
        log_to_mlflow(card, b"weights", tracking_uri=f"file://{tmp_path}/mlruns")
    assert "\n" not in str(err.value)
