"""The ServerApp's rounds and the ClientApp's handlers, wired in-process through a Grid that calls the ClientApp
directly (real Flower messages, no processes): aggregation, rejection of NaN updates, dropout, bad stores,
model mismatch, compression, FedBN and the audit of what the server receives."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from schemas.federation import FederationConfig, RoundRecord
from tasks.errors import InvalidInputError
from tasks.federated import client_app as ca
from tasks.federated import server_app as sa
from tasks.federated.grid import AuditingGrid
from tasks.federated.inprocess import InProcessGrid, run_in_process
from tasks.federated.model import build_model, get_arrays, model_signature, shared_keys
from tasks.federated.rounds import RoundWriter


@pytest.fixture(autouse=True)
def _task_identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    torch.set_num_threads(1)


def run_rounds(cfg: FederationConfig, stores, tmp_path: Path, tamper=None):
    return run_in_process(cfg, stores, tmp_path, tamper=tamper)


def small(**kw) -> FederationConfig:
    base = dict(
        num_rounds=2,
        local_epochs=1,
        learning_rate=5e-3,
        batch_size=8,
        base_channels=4,
        min_available_clients=2,
        round_timeout_s=30,
        wait_for_nodes_s=2,
    )
    base.update(kw)
    return FederationConfig(**base)


def test_rounds_aggregate_save_models_and_never_receive_images(site_stores, tmp_path):
    cfg = small(num_rounds=2)
    grid, records = run_rounds(cfg, site_stores, tmp_path)
    assert [r.round for r in records] == [1, 2]
    assert all(r.aggregated and r.replies_ok == 3 and r.bytes_up > 0 for r in records)
    assert all(r.eval_auc is not None for r in records)
    saved = torch.load(Path(records[-1].model_dir) / "model.pt")
    model = build_model("classify", base_channels=4, seed=0)
    assert set(saved) == set(shared_keys(model, fedbn=False, local_statistics=cfg.local_bn_statistics))
    # every array the server received: model-shaped, never an image or a stack of slices
    audit = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert len(audit) == len(grid.received) > 0
    image_numel = 32 * 32
    for entry in audit:
        for arr in entry["arrays"]:
            assert tuple(arr["shape"][-2:]) != (32, 32)
            assert int(np.prod(arr["shape"])) % image_numel != 0 or arr["name"].endswith("weight")
    for reply in grid.received:
        for record in reply.content.array_records.values():
            for name, a in record.items():
                assert name in saved or name.startswith("topk.")
                assert tuple(a.shape) == tuple(saved[name].shape)


def poison(reply: Message) -> Message:
    if "arrays" not in reply.content:  # evaluate replies carry metrics only
        return reply
    rec = reply.content.array_records["arrays"]
    bad = {k: v.numpy().copy() for k, v in rec.items()}
    first = next(iter(bad))
    bad[first][...] = np.nan
    reply.content["arrays"] = ArrayRecord({k: Array(v) for k, v in bad.items()})
    return reply


def test_a_nan_update_is_rejected_and_the_round_continues(site_stores, tmp_path):
    _, records = run_rounds(small(num_rounds=1), site_stores, tmp_path, tamper={101: poison})
    (r,) = records
    assert r.replies_rejected == 1 and r.replies_ok == 2 and r.aggregated
    saved = torch.load(Path(r.model_dir) / "model.pt")
    assert all(torch.isfinite(t).all() for t in saved.values())


def test_too_few_updates_keep_the_global_model(site_stores, tmp_path):
    _, records = run_rounds(
        small(num_rounds=1, min_available_clients=3), site_stores, tmp_path, tamper={100: poison, 101: poison}
    )
    (r,) = records
    assert not r.aggregated and r.model_dir is None and r.replies_ok == 1


def test_a_site_without_surrogates_fails_alone(site_stores, tmp_path):
    from tasks.storage import SiteStore

    empty = tmp_path / "empty.zarr"
    SiteStore.create(empty, site_id="E")
    _, records = run_rounds(small(num_rounds=1), [*site_stores[:2], empty], tmp_path)
    (r,) = records
    assert r.replies_failed == 1 and r.replies_ok == 2 and r.aggregated
    # the failed site is named with the ClientApp's error, not just counted
    (failure,) = r.failures
    assert (failure.site, failure.phase, failure.reason.value) == ("E", "train", "error")
    assert "run the surrogate stage first" in failure.detail


class _DownAfterRollCall(InProcessGrid):
    """Node 102 answers the roll call, then is gone (listed, sampled, never answers)."""

    def send_and_receive(self, messages, *, timeout=None):
        msgs = list(messages)
        replies = super().send_and_receive(msgs, timeout=timeout)
        if msgs and msgs[0].metadata.message_type == ca.ROLL_CALL:
            self.down.add(102)
        return replies


def test_a_dropped_node_does_not_stall_the_round(site_stores, tmp_path):
    cfg = small(num_rounds=1)
    grid = _DownAfterRollCall(list(site_stores), cfg.to_run_config())
    grid.get_node_ids = lambda: list(grid.contexts)
    model = build_model("classify", base_channels=4, seed=0)
    keys = shared_keys(model, fedbn=False, local_statistics=cfg.local_bn_statistics)
    writer = RoundWriter(cfg, {"metrics_path": str(tmp_path / "m.jsonl")}, 1, model_signature(model, keys))
    sa.run_message_api(
        AuditingGrid(grid),
        cfg,
        writer,
        ConfigRecord({ca.CONFIG_HASH: cfg.config_hash(), ca.SIGNATURE: model_signature(model, keys)}),
    )
    (r,) = [RoundRecord.model_validate_json(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert r.nodes_sampled == 3 and r.replies_failed == 1 and r.replies_ok == 2 and r.aggregated
    # node 102 went down after the roll call: it is named by its site, with the reason
    (failure,) = r.failures
    assert (failure.site, failure.node_id, failure.phase, failure.reason.value) == ("C", 102, "train", "timeout")


def test_a_site_that_never_answered_is_not_asked_again_until_it_does(site_stores, tmp_path):
    cfg = small(num_rounds=2)
    grid = _DownAfterRollCall(list(site_stores), cfg.to_run_config())
    model = build_model("classify", base_channels=4, seed=0)
    keys = shared_keys(model, fedbn=False, local_statistics=cfg.local_bn_statistics)
    writer = RoundWriter(cfg, {"metrics_path": str(tmp_path / "m.jsonl")}, 1, model_signature(model, keys))
    audited = AuditingGrid(grid)
    base = ConfigRecord({ca.CONFIG_HASH: cfg.config_hash(), ca.SIGNATURE: model_signature(model, keys)})
    sa.run_message_api(audited, cfg, writer, base)
    r1, r2 = [RoundRecord.model_validate_json(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert r1.nodes_sampled == 3 and r1.replies_failed == 1
    # round 2 leaves C out (a hung ClientApp would get one more message per round) and says so
    assert r2.nodes_sampled == 2 and r2.replies_ok == 2 and r2.replies_failed == 0 and r2.aggregated
    (busy,) = r2.failures
    assert (busy.site, busy.reason.value) == ("C", "timeout")
    assert busy.detail == "not asked: its round-1 train message is still unanswered"
    assert audited.busy_nodes() == {102: "round-1 train"}


def _lost_by_the_superlink(reply: Message) -> Message:
    """The SuperLink's answer for a node it lost: an error whose source is the SuperLink (node 1), not the node."""
    if reply.metadata.message_type != "train":
        return reply
    lost = Message(Error(code=0, reason="Node Unavailable"), reply_to=reply)
    lost.metadata.__dict__["_reply_to_message_id"] = reply.metadata.reply_to_message_id
    lost.metadata.__dict__["_src_node_id"] = 1
    return lost


def test_an_error_the_superlink_sends_for_a_lost_node_names_that_node(site_stores, tmp_path):
    _, records = run_rounds(small(num_rounds=1), site_stores, tmp_path, tamper={102: _lost_by_the_superlink})
    (r,) = records
    assert r.replies_failed == 1 and r.replies_ok == 2  # one failure, not a timeout of C plus an error of "node 1"
    (failure,) = r.failures
    assert (failure.site, failure.node_id, failure.reason.value) == ("C", 102, "error")
    assert failure.detail == "Node Unavailable"


class _JoinsAfterRoundOne(InProcessGrid):
    """Node 102 connects only after round 1 (a site restarted with a new node id)."""

    rounds_seen = 0

    def get_node_ids(self):
        return [n for n in self.contexts if n != 102 or self.rounds_seen >= 1]

    def send_and_receive(self, messages, *, timeout=None):
        msgs = list(messages)
        replies = super().send_and_receive(msgs, timeout=timeout)
        self.rounds_seen += any(m.metadata.message_type == "evaluate" for m in msgs)
        return replies


def test_a_node_that_joins_later_is_asked_its_site_and_named(site_stores, tmp_path):
    cfg = small(num_rounds=2)
    grid = _JoinsAfterRoundOne(list(site_stores), cfg.to_run_config(), tamper={102: poison})
    model = build_model("classify", base_channels=4, seed=0)
    keys = shared_keys(model, fedbn=False, local_statistics=cfg.local_bn_statistics)
    writer = RoundWriter(cfg, {"metrics_path": str(tmp_path / "m.jsonl")}, 1, model_signature(model, keys))
    base = ConfigRecord({ca.CONFIG_HASH: cfg.config_hash(), ca.SIGNATURE: model_signature(model, keys)})
    sa.run_message_api(AuditingGrid(grid), cfg, writer, base)
    r1, r2 = [RoundRecord.model_validate_json(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert r1.nodes_sampled == 2 and not r1.failures
    assert r2.nodes_sampled == 3 and r2.replies_rejected == 1
    assert [(f.site, f.node_id, f.reason.value) for f in r2.failures] == [("C", 102, "rejected")]
    roll_calls = [m for m in grid.received if m.metadata.message_type == ca.ROLL_CALL]
    assert sorted(int(m.metadata.src_node_id) for m in roll_calls) == [100, 101, 102]  # each node asked once


def test_too_few_free_sites_fail_the_run_naming_the_busy_one(site_stores, tmp_path):
    from tasks.federated.grid import NotEnoughNodesError

    cfg = small(num_rounds=2, wait_for_nodes_s=1)
    grid = _DownAfterRollCall(list(site_stores), cfg.to_run_config())  # C answers the roll call, then hangs
    model = build_model("classify", base_channels=4, seed=0)
    keys = shared_keys(model, fedbn=False, local_statistics=cfg.local_bn_statistics)
    writer = RoundWriter(cfg, {"metrics_path": str(tmp_path / "m.jsonl")}, 1, model_signature(model, keys))
    base = ConfigRecord({ca.CONFIG_HASH: cfg.config_hash(), ca.SIGNATURE: model_signature(model, keys)})
    grid.down.add(101)  # B is gone from the start: it never answers, so it is never named
    busy = r"need 2; busy: node-101 \(no reply to its roll call\), C \(no reply to its round-1 train\)"
    with pytest.raises(NotEnoughNodesError, match=busy):
        sa.run_message_api(AuditingGrid(grid), cfg, writer, base)
    (r1,) = [RoundRecord.model_validate_json(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert not r1.aggregated and {f.site for f in r1.failures} == {"node-101", "C"}


def test_a_rejected_update_is_named(site_stores, tmp_path, caplog):
    caplog.set_level("WARNING", logger="fedscan.federated.server")
    _, records = run_rounds(small(num_rounds=1), site_stores, tmp_path, tamper={101: poison})
    (failure,) = records[0].failures
    assert (failure.site, failure.reason.value) == ("B", "rejected") and "NaN" in failure.detail
    assert any("site B" in r.getMessage() and "rejected" in r.getMessage() for r in caplog.records)


def _site_context(store, cfg: FederationConfig, *, node_id: int) -> Context:
    """A ClientApp context for the site whose store is ``store``, running ``cfg``."""
    return Context(
        run_id=1,
        node_id=node_id,
        node_config={ca.NODE_STORE_KEY: str(store)},
        state=RecordDict(),
        run_config=cfg.to_run_config(),
    )


def test_client_refuses_a_server_with_another_model(site_stores):
    cfg = small()
    ctx = _site_context(site_stores[0], cfg, node_id=100)
    other = build_model("classify", base_channels=8, seed=0)
    keys = shared_keys(other, fedbn=False)
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in get_arrays(other, keys).items()}),
            "config": ConfigRecord({ca.CONFIG_HASH: cfg.config_hash(), ca.SIGNATURE: model_signature(other, keys)}),
        }
    )
    msg = Message(content, dst_node_id=100, message_type="train")
    msg.metadata.__dict__["_message_id"] = "m1"
    with pytest.raises(InvalidInputError, match="model mismatch"):
        ca.app(msg, ctx)


def test_compression_cuts_uplink_bytes_and_fedbn_keeps_bn_home(site_stores, tmp_path):
    _, plain = run_rounds(small(num_rounds=1, base_channels=8), site_stores[:2], tmp_path / "a")
    _, f16 = run_rounds(small(num_rounds=1, base_channels=8, compression="float16"), site_stores[:2], tmp_path / "b")
    _, topk = run_rounds(
        small(num_rounds=1, base_channels=8, compression="topk", topk_fraction=0.1), site_stores[:2], tmp_path / "c"
    )
    assert all(r[0].aggregated for r in (plain, f16, topk))
    # parameter payload: exactly half; whole serialized replies (names, headers, metrics, configs): at least half
    assert f16[0].array_bytes_up * 2 == plain[0].array_bytes_up > 0
    assert f16[0].bytes_up * 2 <= plain[0].bytes_up
    assert plain[0].bytes_up > plain[0].array_bytes_up  # wire bytes include the metadata
    assert topk[0].bytes_up < 0.25 * plain[0].bytes_up
    assert f16[0].bytes_down == plain[0].bytes_down  # the downlink is not compressed
    grid, _ = run_rounds(small(num_rounds=1, fedbn=True), site_stores[:2], tmp_path / "d")
    names = {n for reply in grid.received for rec in reply.content.array_records.values() for n in rec}
    assert names and not any("running_mean" in n or ".1.weight" in n for n in names)


def test_personalisation_reports_local_metrics(site_stores, tmp_path):
    _, records = run_rounds(small(num_rounds=1, personalisation_epochs=1), site_stores[:2], tmp_path)
    assert [r.phase for r in records] == ["train", "personalise"]
    assert records[1].replies_ok == 2 and records[1].eval_auc is not None


def test_server_side_dp_wrapper_runs(site_stores, tmp_path):
    _, records = run_rounds(small(num_rounds=1, dp_mode="server", dp_noise_multiplier=0.01), site_stores[:2], tmp_path)
    assert records[0].aggregated


def test_secagg_plus_aggregates_without_the_server_seeing_a_single_update(site_stores, tmp_path):
    cfg = small(num_rounds=1, secagg=True, dp_mode="client", dp_noise_multiplier=0.01, dp_clipping_norm=5.0)
    grid, records = run_rounds(cfg, site_stores, tmp_path)
    (r,) = records
    assert r.aggregated and r.replies_ok == 3
    train_replies = [m for m in grid.received if m.metadata.message_type == "train" and not m.has_error()]
    assert train_replies
    for reply in train_replies:  # SecAgg+ stages: keys, shares and masked vectors as bytes, no model arrays
        assert all(len(rec) == 0 for rec in reply.content.array_records.values())
    saved = torch.load(Path(r.model_dir) / "model.pt")
    assert all(torch.isfinite(t).all() for t in saved.values())


def test_holdout_split_follows_holdout_seed_not_the_training_seed(site_stores):
    def held_scans(**kw) -> set[int]:
        cfg = FederationConfig(**kw)
        ctx = _site_context(site_stores[0], cfg, node_id=1)
        _, hold = ca._site_split(ctx, cfg)
        return {int(i) for i in np.unique(hold.scan_index)}

    # training seeds share one split, so seeds compare on the same slices
    assert len({frozenset(held_scans(seed=s)) for s in range(6)}) == 1
    # the split itself is a seeded choice (4 scans, 1 held out: some holdout seed picks another scan)
    assert len({frozenset(held_scans(seed=0, holdout_seed=h)) for h in range(8)}) > 1


def test_local_bn_statistics_stay_home_and_each_site_evaluates_with_its_own(site_stores, tmp_path):
    from tasks.federated.data import load_site_data, split_holdout
    from tasks.federated.training import evaluate, recalibrate_batchnorm

    cfg = small(num_rounds=1, local_bn_statistics=True)
    grid, records = run_rounds(cfg, site_stores[:2], tmp_path / "silo")
    _, plain = run_rounds(small(num_rounds=1, local_bn_statistics=False), site_stores[:2], tmp_path / "plain")
    names = {n for reply in grid.received for rec in reply.content.array_records.values() for n in rec}
    assert names and not any("running_" in n for n in names)
    assert any(n.endswith(".1.weight") for n in names)  # BatchNorm scale is averaged
    saved = torch.load(Path(records[0].model_dir) / "model.pt")
    plain_saved = torch.load(Path(plain[0].model_dir) / "model.pt")
    assert not any("running_" in k for k in saved)
    # running statistics do not enter training: the averaged weights are those of plain FedAvg
    for k, v in saved.items():
        torch.testing.assert_close(v, plain_saved[k])
    # the round's evaluation is each site's held-out loss with statistics re-estimated on its training slices
    losses, counts = [], []
    for store in site_stores[:2]:
        train, hold = split_holdout(load_site_data(store, task="classify"), fraction=0.25, seed=cfg.holdout_seed)
        model = build_model("classify", base_channels=4, seed=0)
        model.load_state_dict(saved, strict=False)
        recalibrate_batchnorm(model, train.images, batch_size=cfg.batch_size, device=torch.device("cpu"))
        m = evaluate(model, hold.images, hold.targets, task="classify", batch_size=8, device=torch.device("cpu"))
        losses.append(m["loss"])
        counts.append(hold.num_slices)
    assert records[0].eval_loss == pytest.approx(np.average(losses, weights=counts), rel=1e-4)
    assert records[0].eval_loss != pytest.approx(plain[0].eval_loss, rel=1e-3)
