"""The networks fedscan trains federatedly, and which of their tensors leave a site.

Two plain torch models on single-channel slices ``(batch, 1, H, W)``:

* :class:`LesionClassifier` — three Conv-BatchNorm-ReLU-MaxPool blocks, global average pooling and one logit
  per slice (lesion present).
* :class:`LesionUNet` — a two-level U-Net with BatchNorm, one logit per pixel (lesion mask); H and W must be
  multiples of 4.

What crosses the site boundary is :func:`shared_keys`: every floating-point entry of the ``state_dict``, minus
the BatchNorm entries under FedBN (arXiv:2102.07623: batch-norm layers stay local so each scanner keeps its own
feature statistics), or minus only the BatchNorm running statistics with local statistics (SiloBN,
arXiv:2008.07424: the learnt scale and shift are averaged, the statistics stay home and each site re-estimates
them for the global weights, :func:`tasks.federated.training.recalibrate_batchnorm`). Integer buffers
(``num_batches_tracked``) never leave: they carry no learnt information, and SecAgg+'s float64 round trip
garbles them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from schemas.federation import FederatedTask, FederationConfig
from tasks.errors import InvalidInputError

_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class LesionClassifier(nn.Module):
    """Slice-level lesion classifier: ``(batch, 1, H, W)`` → ``(batch,)`` logits."""

    def __init__(self, *, base_channels: int = 8) -> None:
        super().__init__()
        c = base_channels
        self.features = nn.Sequential(
            _conv_block(1, c),
            nn.MaxPool2d(2),
            _conv_block(c, 2 * c),
            nn.MaxPool2d(2),
            _conv_block(2 * c, 4 * c),
            nn.MaxPool2d(2),
            _conv_block(4 * c, 4 * c),
        )
        self.head = nn.Linear(4 * c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        h = h.mean(dim=(2, 3))
        out: torch.Tensor = self.head(h).squeeze(1)
        return out


class LesionUNet(nn.Module):
    """Two-level U-Net: ``(batch, 1, H, W)`` → ``(batch, H, W)`` logits; H, W multiples of 4."""

    def __init__(self, *, base_channels: int = 8) -> None:
        super().__init__()
        c = base_channels
        self.enc1 = nn.Sequential(_conv_block(1, c), _conv_block(c, c))
        self.enc2 = nn.Sequential(_conv_block(c, 2 * c), _conv_block(2 * c, 2 * c))
        self.bottom = nn.Sequential(_conv_block(2 * c, 4 * c), _conv_block(4 * c, 4 * c))
        self.up2 = nn.ConvTranspose2d(4 * c, 2 * c, kernel_size=2, stride=2)
        self.dec2 = nn.Sequential(_conv_block(4 * c, 2 * c), _conv_block(2 * c, 2 * c))
        self.up1 = nn.ConvTranspose2d(2 * c, c, kernel_size=2, stride=2)
        self.dec1 = nn.Sequential(_conv_block(2 * c, c), _conv_block(c, c))
        self.out = nn.Conv2d(c, 1, kernel_size=1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 4 or x.shape[-2] % 4:
            raise InvalidInputError(f"LesionUNet needs H and W divisible by 4, got {tuple(x.shape[-2:])}")
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        b = self.bottom(self.pool(e2))
        d2 = self.dec2(torch.cat([self.up2(b), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        out: torch.Tensor = self.out(d1).squeeze(1)
        return out


def model_for(cfg: FederationConfig) -> nn.Module:
    """The freshly initialised model a run of ``cfg`` trains: server and clients build the same one."""
    return build_model(
        cfg.task, base_channels=cfg.base_channels, seed=cfg.seed, enhance_batchnorm=cfg.enhance_batchnorm
    )


def build_model(
    task: FederatedTask | str, *, base_channels: int, seed: int, enhance_batchnorm: bool = False
) -> nn.Module:
    """A freshly initialised model for ``task``; the weights depend only on ``seed`` and ``base_channels`` (and
    ``enhance_batchnorm``, which gives the enhance network BatchNorm layers).

    torch's ``nn.init`` draws from the global generator, so the initialisation runs inside
    ``torch.random.fork_rng`` seeded with ``seed``: the caller's global RNG state is left untouched.
    """
    task = FederatedTask(task)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if task is FederatedTask.ENHANCE:  # the enhance stage's network (tasks/federated/enhance_task.py)
            from tasks.enhance.model import Architecture
            from tasks.enhance.model import build_model as build_enhance

            arch = Architecture(channels=base_channels, depth=2, norm="batch" if enhance_batchnorm else "none")
            return build_enhance(arch, generator=torch.Generator().manual_seed(seed))
        if task is FederatedTask.CLASSIFY:
            return LesionClassifier(base_channels=base_channels)
        return LesionUNet(base_channels=base_channels)


def batchnorm_keys(model: nn.Module) -> set[str]:
    """``state_dict`` keys that belong to BatchNorm layers (weights, biases and running statistics)."""
    keys: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, _BATCHNORM):
            prefix = f"{name}." if name else ""
            keys.update(f"{prefix}{k}" for k in module.state_dict())
    return keys


def tracked_batchnorm(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """``(name, layer)`` of every BatchNorm layer that keeps running statistics, in module order: the
    statistics that stay at a site (:func:`batchnorm_statistics_keys`) are exactly the ones it re-estimates
    (:func:`tasks.federated.training.recalibrate_batchnorm`)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _BATCHNORM) and m.track_running_stats]


def batchnorm_statistics_keys(model: nn.Module) -> set[str]:
    """``state_dict`` keys of the BatchNorm running statistics (``running_mean``, ``running_var``)."""
    keys: set[str] = set()
    for name, _ in tracked_batchnorm(model):
        prefix = f"{name}." if name else ""
        keys.update({f"{prefix}running_mean", f"{prefix}running_var"})
    return keys


def shared_keys(model: nn.Module, *, fedbn: bool, local_statistics: bool = False) -> list[str]:
    """The ``state_dict`` keys that are sent to the server, in ``state_dict`` order.

    Floating-point entries only; without BatchNorm entries when ``fedbn``; without the BatchNorm running
    statistics (but with their learnt weight and bias) when ``local_statistics``.
    """
    local = batchnorm_keys(model) if fedbn else set()
    if local_statistics:
        local |= batchnorm_statistics_keys(model)
    return [k for k, v in model.state_dict().items() if v.is_floating_point() and k not in local]


def get_arrays(model: nn.Module, keys: Sequence[str]) -> dict[str, npt.NDArray[np.float32]]:
    """Copies of the named ``state_dict`` entries as float32 numpy arrays."""
    state = model.state_dict()
    return {k: state[k].detach().cpu().numpy().astype(np.float32, copy=True) for k in keys}


def set_arrays(model: nn.Module, arrays: Mapping[str, npt.ArrayLike]) -> None:
    """Load the named entries into ``model`` (in place); the rest of its state is kept.

    Raises
    ------
    InvalidInputError
        A key the model does not have, or an array whose shape differs from the model's.
    """
    state = model.state_dict()
    unknown = sorted(set(arrays) - set(state))
    if unknown:
        raise InvalidInputError(f"model has no entries {unknown[:5]} (model/config mismatch)")
    update: dict[str, torch.Tensor] = {}
    for key, value in arrays.items():
        arr = np.asarray(value)
        if tuple(arr.shape) != tuple(state[key].shape):
            raise InvalidInputError(
                f"array {key!r} has shape {arr.shape}, the model expects {tuple(state[key].shape)} "
                "(model/config mismatch between server and client)"
            )
        update[key] = torch.from_numpy(np.ascontiguousarray(arr)).to(dtype=state[key].dtype)
    model.load_state_dict(update, strict=False)


def model_signature(model: nn.Module, keys: Sequence[str]) -> str:
    """16 hex digits identifying the architecture of the shared entries (names, shapes, order)."""
    state = model.state_dict()
    text = ";".join(f"{k}:{tuple(state[k].shape)}" for k in keys)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
