"""The enhance network and its checkpoint: identity before training, any grid size, per-slice in eval mode, a
checkpoint that refuses another architecture or grid by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.enhance.model import (
    Architecture,
    batches_of,
    build_model,
    enhance_slices,
    load_checkpoint,
    recalibrate_statistics,
    save_checkpoint,
)
from tasks.errors import InvalidInputError, StoreNotFoundError

CPU = torch.device("cpu")
ARCH = Architecture(channels=4, depth=2)


def _slices(n: int = 5, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 200.0, (n, size, size)).astype(np.float32)


def test_an_untrained_network_is_the_identity_on_any_grid() -> None:
    model = build_model(ARCH, generator=torch.Generator().manual_seed(0))
    for size in (32, 30, 17):  # 30 and 17 are padded to a multiple of 4 and cropped back
        x = _slices(2, size)
        np.testing.assert_allclose(enhance_slices(model, x, batch_size=2, device=CPU), x, atol=1e-4)


def test_same_generator_same_weights_other_seed_differs() -> None:
    a = build_model(ARCH, generator=torch.Generator().manual_seed(3)).state_dict()
    torch.manual_seed(123)  # the global generator plays no part
    b = build_model(ARCH, generator=torch.Generator().manual_seed(3)).state_dict()
    c = build_model(ARCH, generator=torch.Generator().manual_seed(4)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("norm", ["none", "batch"])
def test_batched_equals_per_slice(norm: str) -> None:
    model = build_model(Architecture(channels=4, depth=2, norm=norm), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # a non-zero head, so the network does something
        model.head.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    x = _slices(7)
    batched = enhance_slices(model, x, batch_size=4, device=CPU)
    single = enhance_slices(model, x, batch_size=1, device=CPU)
    assert not np.allclose(batched, x, atol=1.0)
    np.testing.assert_allclose(batched, single, rtol=0, atol=1e-3)  # HU; float32 sums in another order


def test_checkpoint_round_trip_and_refusals(tmp_path: Path) -> None:
    model = build_model(ARCH, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "m.pt"
    sha = save_checkpoint(path, model, grid=(32, 32), metadata={"target": "noise2inverse"})
    ckpt = load_checkpoint(path, arch=ARCH, grid=(32, 32))
    assert ckpt.sha256 == sha and len(sha) == 64
    assert ckpt.metadata == {"target": "noise2inverse"}
    x = _slices(2)
    np.testing.assert_array_equal(
        enhance_slices(ckpt.model(device=CPU), x, batch_size=2, device=CPU),
        enhance_slices(model, x, batch_size=2, device=CPU),
    )
    with pytest.raises(InvalidInputError, match=r"another architecture: channels 4 \(expected 8\)"):
        load_checkpoint(path, arch=Architecture(channels=8, depth=2))
    with pytest.raises(InvalidInputError, match="trained on a 32x32 grid, not the 64x64 grid"):
        load_checkpoint(path, grid=(64, 64))
    with pytest.raises(StoreNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InvalidInputError, match="not a fedscan enhance checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"format": "other/1"}, tmp_path / "other.pt")
    with pytest.raises(InvalidInputError, match="format 'other/1'"):
        load_checkpoint(tmp_path / "other.pt")


def test_nan_input_and_bad_batch_size_are_refused() -> None:
    model = build_model(ARCH)
    x = _slices(2)
    with pytest.raises(InvalidInputError, match="batch_size"):
        enhance_slices(model, x, batch_size=0, device=CPU)
    x[1, 3, 3] = np.nan
    with pytest.raises(InvalidInputError, match="NaN"):
        enhance_slices(model, x, batch_size=1, device=CPU)


def test_recalibrated_statistics_are_the_data_s_and_a_network_without_batchnorm_is_untouched() -> None:
    rng = np.random.default_rng(0)
    slices = (300.0 * rng.standard_normal((6, 16, 16)) + 40.0).astype(np.float32)
    net = build_model(Architecture(channels=2, depth=1, norm="batch"), generator=torch.Generator().manual_seed(0))
    net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert recalibrate_statistics(net, batches_of(slices, 2), device=torch.device("cpu")) == 6  # 2 per block
    # the first BatchNorm layer's mean: the mean over all slices of the first convolution's output
    conv, bn = net.down[0][0], net.down[0][1]
    with torch.no_grad():
        first = conv(torch.as_tensor(slices)[:, None] / net.arch.intensity_scale_hu)
    torch.testing.assert_close(bn.running_mean, first.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert not net.training and bn.momentum == 0.1  # mode and momentum restored
    changed = {k for k in before if not torch.equal(before[k], net.state_dict()[k])}
    assert changed and all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in changed)
    plain = build_model(Architecture(channels=2, depth=1), generator=torch.Generator().manual_seed(0))
    assert recalibrate_statistics(plain, batches_of(slices, 2), device=torch.device("cpu")) == 0
    with pytest.raises(InvalidInputError, match="NaN or inf"):
        recalibrate_statistics(net, [np.full((1, 16, 16), np.nan, np.float32)], device=torch.device("cpu"))
