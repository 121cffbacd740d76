"""Plain-torch parts: models, shared keys (FedBN), metrics, local training, update compression."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from schemas.federation import FederatedTask
from tasks.errors import InvalidInputError
from tasks.federated.compression import FLOAT16_DELTA, TOPK_INDICES, decode_update, encode_update, payload_bytes
from tasks.federated.model import (
    batchnorm_keys,
    batchnorm_statistics_keys,
    build_model,
    get_arrays,
    model_signature,
    set_arrays,
    shared_keys,
)
from tasks.federated.training import (
    auc_score,
    bootstrap_aucs,
    bootstrap_indices,
    bootstrap_seed_draws,
    dice_score,
    evaluate,
    percentile_ci,
    recalibrate_batchnorm,
    standardise_slices,
    train_local,
)

from .conftest import synthetic_scans

CPU = torch.device("cpu")


def test_auc_matches_pairwise_definition_with_ties(rng):
    scores = rng.integers(0, 5, size=40).astype(float)  # many ties
    labels = rng.integers(0, 2, size=40)
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairs = [(1.0 if p > n else 0.5 if p == n else 0.0) for p, n in itertools.product(pos, neg)]
    assert auc_score(scores, labels) == pytest.approx(np.mean(pairs))
    assert auc_score([0.1, 0.9], [0, 1]) == 1.0
    assert np.isnan(auc_score([0.1, 0.2], [1, 1]))


def test_bootstrap_auc_is_stratified_paired_and_matches_auc_score(rng):
    labels = (rng.random(300) < 0.2).astype(np.uint8)
    good = labels + rng.normal(0, 0.8, 300)  # informative scores
    noise = rng.normal(0, 1, 300)  # uninformative
    idx = bootstrap_indices(labels, n_boot=400, seed=1)
    assert idx.shape == (400, 300)
    assert (labels[idx].sum(axis=1) == labels.sum()).all()  # class counts kept on every resample
    boot_good = bootstrap_aucs([good], labels, idx)
    for b in (0, 7, 399):  # each resample's AUC is the Mann–Whitney AUC of that resample
        assert boot_good[b] == pytest.approx(auc_score(good[idx[b]], labels[idx[b]]))
    # averaging over score sets (seeds) averages the per-resample AUCs
    both = bootstrap_aucs([good, noise], labels, idx)
    np.testing.assert_allclose(both, (boot_good + bootstrap_aucs([noise], labels, idx)) / 2)
    # paired: a method against itself differs by exactly 0 on every resample
    assert (boot_good - bootstrap_aucs([good.copy()], labels, idx) == 0).all()
    lo, hi = percentile_ci(boot_good - bootstrap_aucs([noise], labels, idx))
    assert 0 < lo < hi  # the informative scorer is better, and the interval says so
    lo, hi = percentile_ci(boot_good)
    assert lo < auc_score(good, labels) < hi
    perfect = bootstrap_aucs([labels.astype(float)], labels, idx)
    assert percentile_ci(perfect) == (1.0, 1.0)


def test_seed_bootstrap_resamples_seeds_and_stays_paired(rng):
    labels = (rng.random(200) < 0.3).astype(np.uint8)
    seeds = [labels + rng.normal(0, sd, 200) for sd in (0.3, 0.6, 1.2, 2.5)]  # seeds of very different quality
    idx = bootstrap_indices(labels, n_boot=300, seed=2)
    draws = bootstrap_seed_draws(len(seeds), n_boot=300, seed=3)
    assert draws.shape == (300, 4)
    assert draws.min() >= 0 and draws.max() <= 3
    two_level = bootstrap_aucs(seeds, labels, idx, seed_draws=draws)
    for b in (0, 11, 299):  # resample b averages the AUCs of its drawn seeds on its drawn crops
        expected = np.mean([auc_score(seeds[k][idx[b]], labels[idx[b]]) for k in draws[b]])
        assert two_level[b] == pytest.approx(expected)
    # drawing every seed once is the test-only bootstrap
    every = np.tile(np.arange(4), (300, 1))
    np.testing.assert_allclose(bootstrap_aucs(seeds, labels, idx, seed_draws=every), bootstrap_aucs(seeds, labels, idx))
    # the seed spread widens the interval; a method against itself still differs by exactly 0 (paired draws)
    lo1, hi1 = percentile_ci(bootstrap_aucs(seeds, labels, idx))
    lo2, hi2 = percentile_ci(two_level)
    assert hi2 - lo2 > 1.5 * (hi1 - lo1)
    assert (two_level - bootstrap_aucs([s.copy() for s in seeds], labels, idx, seed_draws=draws) == 0).all()
    with pytest.raises(InvalidInputError):
        bootstrap_aucs(seeds, labels, idx, seed_draws=draws[:10])
    with pytest.raises(InvalidInputError):
        bootstrap_aucs(seeds[:2], labels, idx, seed_draws=draws)
    with pytest.raises(InvalidInputError):
        bootstrap_seed_draws(0, n_boot=3, seed=0)


def test_bootstrap_needs_both_classes():
    with pytest.raises(InvalidInputError):
        bootstrap_indices(np.ones(10), n_boot=5, seed=0)


def test_dice():
    a = np.zeros((4, 4), bool)
    a[:2] = True
    b = np.zeros((4, 4), bool)
    b[1:3] = True
    assert dice_score(a, b) == pytest.approx(2 * 4 / 16)
    assert dice_score(a, a) == 1.0
    assert dice_score(np.zeros(3), np.zeros(3)) == 1.0


def test_fedbn_keeps_batchnorm_and_integer_buffers_local():
    model = build_model("classify", base_channels=4, seed=0)
    bn = batchnorm_keys(model)
    assert any(k.endswith("running_mean") for k in bn)
    everything = shared_keys(model, fedbn=False)
    local_bn = shared_keys(model, fedbn=True)
    assert not any("num_batches_tracked" in k for k in everything)
    assert set(local_bn) == set(everything) - bn
    assert model_signature(model, everything) != model_signature(model, local_bn)


def test_local_statistics_keep_only_the_running_statistics_home():
    model = build_model("classify", base_channels=4, seed=0)
    stats = batchnorm_statistics_keys(model)
    assert stats and all(k.endswith(("running_mean", "running_var")) for k in stats)
    everything = shared_keys(model, fedbn=False)
    silo = shared_keys(model, fedbn=False, local_statistics=True)
    assert set(silo) == set(everything) - stats
    assert any(k.endswith(".1.weight") for k in silo)  # the learnt BatchNorm scale is still averaged
    assert set(shared_keys(model, fedbn=True, local_statistics=True)) == set(everything) - batchnorm_keys(model)
    assert model_signature(model, silo) != model_signature(model, everything)


def test_recalibrate_batchnorm_re_estimates_statistics_and_nothing_else(rng):
    model = build_model("classify", base_channels=4, seed=0)
    images = (3.0 + 2.0 * rng.normal(size=(24, 16, 16))).astype(np.float32)
    images[:, 4:9, 4:9] += 5.0
    original = images.copy()
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    model.eval()
    assert recalibrate_batchnorm(model, images, batch_size=8, device=CPU) == 4
    assert not model.training  # mode restored
    np.testing.assert_array_equal(images, original)  # input untouched
    for k, v in model.state_dict().items():
        if k in weights:
            assert torch.equal(v, weights[k])
    conv, bn = model.features[0][0], model.features[0][1]
    assert bn.momentum == 0.1  # momentum restored
    with torch.no_grad():
        out = conv(torch.from_numpy(standardise_slices(images)).unsqueeze(1))
    # three equal batches: the average of the batch means is the mean over all slices
    torch.testing.assert_close(bn.running_mean, out.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    batch_vars = torch.stack([out[i : i + 8].var(dim=(0, 2, 3), unbiased=True) for i in (0, 8, 16)])
    torch.testing.assert_close(bn.running_var, batch_vars.mean(dim=0), rtol=1e-4, atol=1e-5)
    with pytest.raises(InvalidInputError):
        recalibrate_batchnorm(model, images[:1], batch_size=8, device=CPU)


def test_build_model_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a = get_arrays(build_model("segment", base_channels=4, seed=3), ["out.weight"])
    b = get_arrays(build_model("segment", base_channels=4, seed=3), ["out.weight"])
    c = get_arrays(build_model("segment", base_channels=4, seed=4), ["out.weight"])
    assert np.array_equal(a["out.weight"], b["out.weight"])
    assert not np.array_equal(a["out.weight"], c["out.weight"])
    assert torch.equal(state, torch.random.get_rng_state())


def test_set_arrays_refuses_a_model_mismatch():
    model = build_model("classify", base_channels=4, seed=0)
    other = build_model("classify", base_channels=8, seed=0)
    keys = shared_keys(other, fedbn=False)
    with pytest.raises(InvalidInputError, match="mismatch"):
        set_arrays(model, get_arrays(other, keys))


@pytest.mark.parametrize("task", [FederatedTask.CLASSIFY, pytest.param(FederatedTask.SEGMENT, marks=pytest.mark.slow)])
def test_local_training_learns_the_synthetic_lesions(task):
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    scans = synthetic_scans(rng, n_scans=2, n_slices=32)
    (_, x_tr, y_tr, m_tr), (_, x_te, y_te, m_te) = scans
    model = build_model(task, base_channels=4, seed=0)
    targets_tr, targets_te = (y_tr, y_te) if task is FederatedTask.CLASSIFY else (m_tr, m_te)
    before = evaluate(model, x_te, targets_te, task=task, batch_size=16, device=CPU)
    train_local(
        model,
        x_tr,
        targets_tr,
        task=task,
        epochs=8,
        learning_rate=1e-2,
        batch_size=8,
        generator=torch.Generator().manual_seed(0),
        device=CPU,
    )
    after = evaluate(model, x_te, targets_te, task=task, batch_size=16, device=CPU)
    assert after["loss"] < before["loss"]
    assert after["auc"] > 0.85
    if task is FederatedTask.SEGMENT:
        assert after["dice"] > before["dice"]


def test_fedprox_term_keeps_the_model_near_the_anchor():
    rng = np.random.default_rng(1)
    ((_, x, y, _),) = synthetic_scans(rng, n_scans=1, n_slices=24)
    drift = {}
    for mu in (0.0, 10.0):
        model = build_model("classify", base_channels=4, seed=0)
        anchor = {k: v.detach().clone() for k, v in model.named_parameters()}
        train_local(
            model,
            x,
            y,
            task="classify",
            epochs=3,
            learning_rate=1e-2,
            batch_size=8,
            generator=torch.Generator().manual_seed(0),
            device=CPU,
            proximal_mu=mu,
            anchor=anchor,
        )
        drift[mu] = sum(float(((p.detach() - anchor[k]) ** 2).sum()) for k, p in model.named_parameters())
    assert drift[10.0] < 0.5 * drift[0.0]


def test_float16_compression_halves_bytes_and_stays_close(rng):
    ref = {"a": rng.normal(size=(64, 3)).astype(np.float32), "b": rng.normal(size=7).astype(np.float32)}
    local = {k: v + 0.01 * rng.normal(size=v.shape).astype(np.float32) for k, v in ref.items()}
    enc, residual = encode_update(local, ref, kind="float16")
    assert residual is None
    assert payload_bytes(enc) * 2 == payload_bytes(local)
    assert list(enc) == [FLOAT16_DELTA] and enc[FLOAT16_DELTA].dtype == np.float16  # one flat vector
    dec = decode_update(enc, ref, kind="float16")
    for k in ref:
        assert dec[k].shape == ref[k].shape
        np.testing.assert_allclose(dec[k], local[k], atol=1e-4)
    assert ref["a"].flags.writeable and np.array_equal(ref["a"], ref["a"].copy())


def test_topk_sends_the_largest_entries_and_carries_the_rest(rng):
    ref = {"a": np.zeros((10, 10), np.float32), "b": np.zeros(20, np.float32)}
    local = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in ref.items()}
    enc, residual = encode_update(local, ref, kind="topk", topk_fraction=0.1)
    assert enc[TOPK_INDICES].size == 12
    assert payload_bytes(enc) < payload_bytes(local) / 4
    dec = decode_update(enc, ref, kind="topk")
    flat_local = np.concatenate([local["a"].ravel(), local["b"]])
    flat_dec = np.concatenate([dec["a"].ravel(), dec["b"]])
    np.testing.assert_allclose(flat_dec + residual, flat_local, atol=1e-6)  # nothing lost
    assert np.abs(flat_local[flat_dec != 0]).min() >= np.abs(residual).max()  # the kept ones are the largest
    # next round: the residual is added back before selecting
    enc2, _ = encode_update(ref, ref, kind="topk", topk_fraction=0.1, residual=residual)
    assert np.abs(decode_update(enc2, ref, kind="topk")["a"]).sum() > 0


def test_decode_refuses_malformed_updates():
    ref = {"a": np.zeros(4, np.float32)}
    with pytest.raises(InvalidInputError):
        decode_update({"a": np.zeros(4, np.float16)}, ref, kind="float16")
    with pytest.raises(InvalidInputError):
        decode_update({FLOAT16_DELTA: np.zeros(5, np.float16)}, ref, kind="float16")
    with pytest.raises(InvalidInputError):
        decode_update({TOPK_INDICES: np.array([9], np.int32), "topk.values": np.ones(1, np.float32)}, ref, kind="topk")
