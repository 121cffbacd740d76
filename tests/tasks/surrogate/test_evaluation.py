"""Evaluation helpers: AUC against its definition, CIs, metrics, host identification, public data, figure."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tasks.errors import InvalidInputError
from tasks.surrogate.evaluation import (
    TrainSettings,
    auc_score,
    classify,
    classify_per_seed,
    draw_tradeoff_png,
    identify_hosts,
    image_metrics,
    mean_ci,
    predict,
    public_ct_like_images,
    train_regressor,
)
from tasks.surrogate.hosts import HOST_NAMES, load_host
from tasks.surrogate.kernels import hide


def test_auc_equals_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, size=40).astype(float)  # many ties
    labels = rng.random(40) < 0.4
    pos, neg = scores[labels], scores[~labels]
    pairwise = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (pos.size * neg.size)
    assert auc_score(scores, labels) == pytest.approx(pairwise)
    assert auc_score([0.1, 0.2, 0.9, 0.8], [0, 0, 1, 1]) == 1.0
    with pytest.raises(InvalidInputError, match="both classes"):
        auc_score([0.1, 0.2], [1, 1])


def test_mean_ci():
    m, h = mean_ci([1.0, 2.0, 3.0])
    assert m == pytest.approx(2.0) and h == pytest.approx(4.303 / np.sqrt(3), rel=1e-3)
    assert mean_ci([0.7]) == (0.7, 0.0)


def test_image_metrics_identity_and_order():
    rng = np.random.default_rng(1)
    ref = rng.random((2, 16, 16)).astype(np.float32)
    psnr_close, ssim_close = image_metrics(ref, ref + 0.01)
    psnr_far, ssim_far = image_metrics(ref, ref + 0.1 * rng.standard_normal(ref.shape))
    assert psnr_close > psnr_far and ssim_close > ssim_far
    assert psnr_close == pytest.approx(40.0, abs=0.01)


def test_hosts_are_identifiable_from_surrogates():
    shape = (32, 32)
    pool = np.stack([np.array(load_host(n, shape)) for n in HOST_NAMES])
    private = public_ct_like_images(4, shape, rng=np.random.default_rng(2))
    true = np.array([3, 0, 9, 3])
    surrogates = hide(private, pool[true], alpha=0.1, beta=0.5)
    np.testing.assert_array_equal(identify_hosts(surrogates, pool, alpha=0.1), true)


def test_public_images_are_ct_like_and_seeded():
    a = public_ct_like_images(6, (24, 20), rng=np.random.default_rng(3))
    b = public_ct_like_images(6, (24, 20), rng=np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (6, 24, 20) and a.dtype == np.float32
    assert a.min() >= -0.05 and a.max() <= 1.2 and a.std() > 0.1


@pytest.mark.slow
def test_regressor_learns_a_simple_map():
    rng = np.random.default_rng(4)
    x = rng.random((32, 16, 16)).astype(np.float32)
    y = 0.5 * x
    net = train_regressor(x, y, settings=TrainSettings(steps=60, batch_size=8, learning_rate=3e-3))
    before = np.abs(x - y).mean()
    after = np.abs(predict(net, x) - y).mean()
    assert after < 0.5 * before


@pytest.mark.slow
def test_regressor_history_records_every_step_and_leaves_training_unchanged():
    rng = np.random.default_rng(6)
    x = rng.random((16, 8, 8)).astype(np.float32)
    y = 0.5 * x
    settings = TrainSettings(steps=12, batch_size=4, learning_rate=3e-3)
    history: list[float] = []
    with_history = train_regressor(x, y, settings=settings, history=history)
    without = train_regressor(x, y, settings=settings)
    assert len(history) == settings.steps and all(np.isfinite(history))
    assert np.mean(history[-4:]) < np.mean(history[:4])  # the L1 of a learnable map goes down
    np.testing.assert_array_equal(predict(with_history, x), predict(without, x))


@pytest.mark.slow
def test_classifier_separates_an_easy_task():
    rng = np.random.default_rng(5)
    n = 64
    labels = np.arange(n) % 2
    yy, xx = np.mgrid[:16, :16]
    blob = np.exp(-((yy - 8) ** 2 + (xx - 8) ** 2) / 6.0)
    images = (rng.normal(0, 0.3, (n, 16, 16)) + 2.0 * labels[:, None, None] * blob).astype(np.float32)
    out = classify(
        (images[:48], labels[:48]),
        (images[48:], labels[48:]),
        seeds=[0],
        settings=TrainSettings(steps=60, batch_size=16, learning_rate=3e-3),
    )
    assert out["auc"] > 0.8


@pytest.mark.slow
def test_classify_per_seed_is_paired_and_matches_classify():
    rng = np.random.default_rng(7)
    n = 24
    labels = np.arange(n) % 2
    images = (rng.normal(0, 1.0, (n, 8, 8)) + labels[:, None, None]).astype(np.float32)
    train, test = (images[:16], labels[:16]), (images[16:], labels[16:])
    settings = TrainSettings(steps=4, batch_size=4)
    aucs, accs = classify_per_seed(train, test, seeds=[3, 1], settings=settings)
    again, _ = classify_per_seed(train, test, seeds=[1], settings=settings)
    assert len(aucs) == len(accs) == 2 and again[0] == aucs[1]  # a seed's run does not depend on the others
    assert all(0.0 <= v <= 1.0 for v in aucs + accs)
    out = classify(train, test, seeds=[3, 1], settings=settings)
    assert out["auc"] == pytest.approx(np.mean(aucs)) and out["accuracy"] == pytest.approx(np.mean(accs))


def test_tradeoff_png(tmp_path):
    pts = [
        {"alpha": 0.1, "beta": 0.5, "attack_psnr_db": 18.0, "auc": 0.7, "auc_ci95": 0.05},
        {"alpha": 0.2, "beta": 0.8, "attack_psnr_db": 22.0, "auc": 0.8},
    ]
    path = draw_tradeoff_png(
        pts, tmp_path / "curve.png", reference={"attack_psnr_db": 40.0, "auc": 0.9}, note="two\nlines"
    )
    img = Image.open(path)
    assert img.size == (960, 520)
    colours = {tuple(c) for c in np.unique(np.asarray(img.convert("RGB")).reshape(-1, 3), axis=0)}
    assert (65, 105, 225) in colours  # royalblue points
    assert (220, 20, 60) in colours  # crimson plaintext line
    assert (176, 196, 222) in colours  # lightsteelblue error bar of the point with a CI
    bare = Image.open(draw_tradeoff_png(pts[1:], tmp_path / "bare.png"))
    bare_colours = {tuple(c) for c in np.unique(np.asarray(bare.convert("RGB")).reshape(-1, 3), axis=0)}
    assert (220, 20, 60) not in bare_colours and (176, 196, 222) not in bare_colours
    with pytest.raises(InvalidInputError, match="no sweep points"):
        draw_tradeoff_png([], tmp_path / "none.png")
