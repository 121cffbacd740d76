"""Gradient inversion: recovers a slice from the single-slice gradient of a tiny linear and a tiny conv model
(so it can fail), infers the label, and gives a finite figure on the diagnostic classifier."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tasks.errors import InvalidInputError
from tasks.federated.model import build_model
from tasks.privacy.inversion import image_quality, infer_binary_label, invert_gradient, slice_gradient

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _blob(size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.uniform(size * 0.3, size * 0.7, 2)
    img = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (size / 6) ** 2)) + 0.3 * yy / size
    return img.astype(np.float32)


def _linear(size: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(size * size, 1))


@pytest.mark.parametrize("label", [0, 1])
def test_linear_model_gradient_gives_the_slice_back(label):
    rng = np.random.default_rng(label)
    img = _blob(8, rng)
    model = _linear(8)
    grads = slice_gradient(model, img, label, device=CPU)
    assert infer_binary_label(grads) == label
    rec = invert_gradient(
        model,
        grads,
        shape=(8, 8),
        iterations=300,
        tv_weight=0.0,
        generator=torch.Generator().manual_seed(0),
        device=CPU,
    )
    assert image_quality(img, rec)["psnr_db"] > 30
    # a different slice's gradient rebuilds that slice, not this one
    other = _blob(8, np.random.default_rng(10 + label))
    rec2 = invert_gradient(
        model,
        slice_gradient(model, other, label, device=CPU),
        shape=(8, 8),
        iterations=300,
        tv_weight=0.0,
        generator=torch.Generator().manual_seed(0),
        device=CPU,
    )
    assert image_quality(img, rec2)["psnr_db"] < image_quality(other, rec2)["psnr_db"] - 10


def test_tiny_conv_model_gradient_resembles_the_slice_better_than_a_random_guess():
    rng = np.random.default_rng(3)
    img = _blob(16, rng)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Sigmoid(), nn.Flatten(), nn.Linear(4 * 16 * 16, 1))
    grads = slice_gradient(model, img, 1, device=CPU)
    rec = invert_gradient(
        model,
        grads,
        shape=(16, 16),
        iterations=500,
        tv_weight=1e-3,
        generator=torch.Generator().manual_seed(0),
        device=CPU,
    )
    noise = np.random.default_rng(4).normal(size=(16, 16))
    assert image_quality(img, rec)["psnr_db"] > 20
    assert image_quality(img, rec)["psnr_db"] > image_quality(img, noise)["psnr_db"] + 10


def test_diagnostic_classifier_attack_reports_a_finite_figure():
    img = _blob(32, np.random.default_rng(5))
    model = build_model("classify", base_channels=4, seed=0)
    grads = slice_gradient(model, img, 1, device=CPU)
    rec = invert_gradient(
        model, grads, shape=(32, 32), iterations=20, generator=torch.Generator().manual_seed(0), device=CPU
    )
    q = image_quality(img, rec)
    assert np.isfinite(q["psnr_db"]) and -1 <= q["ssim"] <= 1
    assert np.allclose([rec.mean(), rec.std()], [0, 1], atol=1e-3)
    for p in model.parameters():  # the attack works on a copy
        assert p.grad is None


def test_bad_inputs_are_refused():
    model = _linear(4)
    with pytest.raises(InvalidInputError, match="label"):
        slice_gradient(model, np.zeros((4, 4)), 2, device=CPU)
    with pytest.raises(InvalidInputError, match="image"):
        slice_gradient(model, np.zeros((1, 4, 4)), 0, device=CPU)
    with pytest.raises(InvalidInputError, match="match"):
        invert_gradient(model, [torch.zeros(3)], shape=(4, 4), generator=torch.Generator(), device=CPU)
    with pytest.raises(InvalidInputError, match="bias"):
        infer_binary_label([torch.zeros(3)])


# ------------------------------------------------------------------------------------------------
# With SecAgg+ the server holds only the sum (Flower's SecAgg+ workflow and mod, run in-process)
# ------------------------------------------------------------------------------------------------
def _sites(root, n: int = 3):
    from tasks.federated.data import write_site_surrogates

    stores = []
    for k in range(n):
        rng = np.random.default_rng(k)
        scans = []
        for s in range(3):
            labels = (rng.random(8) < 0.5).astype(np.uint8)
            images = rng.normal(size=(8, 16, 16)).astype(np.float32) * (1 + k) + 3.0 * labels[:, None, None] + k
            masks = np.repeat(labels[:, None, None], 16, 1).repeat(16, 2).astype(np.uint8)
            scans.append((f"scan-{s}", images, labels, masks))
        write_site_surrogates(root / f"S{k}.zarr", site_id=f"S{k}", scans=scans)
        stores.append(root / f"S{k}.zarr")
    return stores


def test_secagg_server_holds_only_the_sum_and_batchnorm_statistics_stay_home(tmp_path, monkeypatch):
    from flwr.common import bytes_to_ndarray
    from flwr.supercore.task_identity import TaskIdentity

    from schemas.federation import FederationConfig
    from tasks.federated import client_app as ca
    from tasks.federated.inprocess import run_in_process
    from tasks.federated.model import batchnorm_statistics_keys, shared_keys

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    cfg = FederationConfig(
        num_rounds=1,
        local_epochs=1,
        learning_rate=5e-3,
        batch_size=8,
        base_channels=4,
        min_available_clients=2,
        secagg=True,
        secagg_num_shares=3,
        secagg_reconstruction_threshold=2,
        local_bn_statistics=True,
        round_timeout_s=30,
        wait_for_nodes_s=2,
    )
    sent: dict[int, tuple[dict[str, np.ndarray], int]] = {}
    real_train = ca._train

    def spy(arrays, config, context):  # what each client hands to secaggplus_mod, in plaintext
        new, metrics = real_train(arrays, config, context)
        sent[int(context.node_id)] = (new, int(metrics["num-examples"]))
        return new, metrics

    monkeypatch.setattr(ca, "_train", spy)
    grid, records = run_in_process(cfg, _sites(tmp_path), tmp_path / "run")
    assert records[0].aggregated and len(sent) == 3
    model = build_model("classify", base_channels=4, seed=0)
    keys = shared_keys(model, fedbn=False, local_statistics=True)
    stats = batchnorm_statistics_keys(model)
    assert stats and not stats & set(keys)
    # the clients mask only the shared arrays: no BatchNorm running statistics enter SecAgg+
    assert all(list(new) == keys for new, _ in sent.values())
    masked = {}
    for reply in grid.received:
        assert all(len(rec) == 0 for rec in reply.content.array_records.values())  # no model array, ever
        for rec in reply.content.config_records.values():
            if "masked_params" in rec:
                masked[int(reply.metadata.src_node_id)] = [bytes_to_ndarray(b) for b in rec["masked_params"]]
    assert set(masked) == set(sent)
    for node, vec in masked.items():  # one weight factor, then exactly the shared arrays
        state = model.state_dict()
        assert [v.shape for v in vec[1:]] == [tuple(state[k].shape) for k in keys]
        flat_masked = np.concatenate([v.ravel() for v in vec[1:]]).astype(np.float64)
        flat_plain = np.concatenate([v.ravel() for v in sent[node][0].values()]).astype(np.float64)
        assert abs(np.corrcoef(flat_masked, flat_plain)[0, 1]) < 0.1  # the masked vector hides the update
    # what the server saved is the example-weighted mean of the clients' arrays (SecAgg+ quantisation aside)
    saved = torch.load(records[0].model_dir + "/model.pt")
    assert list(saved) == keys
    total = sum(n for _, n in sent.values())
    for k in keys:
        mean = sum(new[k] * n for new, n in sent.values()) / total
        np.testing.assert_allclose(saved[k].numpy(), mean, atol=1e-3)
    # each site's statistics stay in its own state and differ between sites (they never were averaged)
    local = [ctx.state.array_records[ca._LOCAL_MODEL].to_torch_state_dict() for ctx in grid.contexts.values()]
    key = sorted(stats)[0]
    assert not torch.allclose(local[0][key], local[1][key])
    audit = (tmp_path / "run" / "audit.jsonl").read_text().splitlines()
    assert audit and not any("running_" in line for line in audit)


@pytest.mark.slow
@pytest.mark.integration
def test_simulation_with_secagg_and_local_statistics_never_ships_batchnorm_statistics(tmp_path):
    """The same composition on Flower's Simulation Engine (real processes): the server's audit holds SecAgg+'s
    byte payloads only, never a model array or a BatchNorm statistic, and the saved global model has none."""
    import json

    from schemas.federation import FederationConfig
    from tasks.federated.runner import SimulationTarget, run_federation

    cfg = FederationConfig(
        num_rounds=2,
        local_epochs=1,
        learning_rate=5e-3,
        batch_size=8,
        base_channels=4,
        min_available_clients=3,
        secagg=True,
        secagg_num_shares=3,
        secagg_reconstruction_threshold=2,
        local_bn_statistics=True,
        round_timeout_s=120,
        wait_for_nodes_s=120,
    )
    report = run_federation(
        cfg,
        target=SimulationTarget(site_stores=_sites(tmp_path)),
        output_dir=tmp_path / "out",
        timeout_s=500,
        audit=True,
    )
    assert report.status == "finished:completed"
    assert all(r.aggregated and r.replies_ok == 3 for r in report.train_rounds)
    entries = [json.loads(x) for x in next((tmp_path / "out" / "runs").glob("*/audit.jsonl")).read_text().splitlines()]
    train = [e for e in entries if e["message_type"] == "train" and not e["error"]]
    assert train and any(a["name"] == "masked_params" for e in train for a in e["arrays"])
    for e in train:
        assert all(a["dtype"] == "bytes" for a in e["arrays"]), e  # keys, shares, masked vectors: no arrays
    assert not any("running_" in a["name"] for e in entries for a in e["arrays"])
    saved = torch.load(Path(report.final_model_dir) / "model.pt")
    model = build_model("classify", base_channels=4, seed=0)
    assert list(saved) == shared_keys_of(model)


def shared_keys_of(model):
    from tasks.federated.model import shared_keys

    return shared_keys(model, fedbn=False, local_statistics=True)
