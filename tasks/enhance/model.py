"""The enhance network: a compact 2-D residual U-Net in plain torch, and its checkpoint format.

Plain torch rather than MONAI: MONAI 1.6.1's metadata accepts torch 2.13 (``torch>=2.8``), but the network is
~80 lines here and a second deep-learning dependency in the lock file buys nothing for it.

The network maps a slice in HU to a slice in HU: ``y = x + s * f(x / s)`` with ``s`` the architecture's
``intensity_scale_hu``, so an untrained head (initialised to zero) is the identity. A checkpoint records the
architecture and the slice grid (pixels) it was trained on; :func:`load_checkpoint` refuses another of either,
naming the field. No Prefect, Dask, Zarr or Flower here (the federated apps and the stage driver only wire it).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.nn import functional as F

from tasks.errors import InvalidInputError, StoreNotFoundError

__all__ = [
    "BN_STATISTICS_KEY",
    "CHECKPOINT_FORMAT",
    "Architecture",
    "Checkpoint",
    "ResidualUNet",
    "batches_of",
    "build_model",
    "enhance_slices",
    "load_checkpoint",
    "recalibrate_statistics",
    "save_checkpoint",
]

#: Written into every checkpoint; another value is refused.
CHECKPOINT_FORMAT = "fedscan-enhance/1"

Norm = Literal["none", "batch"]

#: Checkpoint metadata key: ``"site-local"`` when the BatchNorm running statistics were kept at the training sites
#: (SiloBN) and are not in the file, so they are re-estimated where the network is used.
BN_STATISTICS_KEY = "bn_statistics"


@dataclass(frozen=True)
class Architecture:
    """What a checkpoint's weights fit: the network's name and every constructor argument.

    ``norm="batch"`` gives each block BatchNorm layers (the site-local statistics SiloBN/FedBN keep out of
    averaging); ``"none"`` gives a network whose output for one slice does not depend on its batch neighbours
    in training either.
    """

    name: Literal["residual-unet"] = "residual-unet"
    channels: int = 16
    depth: int = 2
    norm: Norm = "none"
    intensity_scale_hu: float = 1000.0

    def __post_init__(self) -> None:
        if self.channels < 1 or self.depth < 1 or self.depth > 5:
            raise InvalidInputError(f"architecture: channels ({self.channels}) >= 1, depth ({self.depth}) in [1, 5]")
        if self.norm not in ("none", "batch"):
            raise InvalidInputError(f"architecture: norm must be 'none' or 'batch', got {self.norm!r}")
        if not self.intensity_scale_hu > 0:
            raise InvalidInputError(f"architecture: intensity_scale_hu must be > 0, got {self.intensity_scale_hu}")


def _block(c_in: int, c_out: int, norm: Norm) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c in (c_in, c_out):
        layers.append(nn.Conv2d(c, c_out, 3, padding=1, bias=norm == "none"))
        if norm == "batch":
            layers.append(nn.BatchNorm2d(c_out))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class ResidualUNet(nn.Module):
    """U-Net (``depth`` poolings, channels doubling per level) predicting a residual added to its input.

    Input ``(batch, 1, ny, nx)`` or ``(batch, ny, nx)`` in HU; output the same shape. Any ``ny, nx``: the slice is
    padded (edge values) to a multiple of ``2**depth`` and cropped back.
    """

    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        self.arch = arch
        c = arch.channels
        widths = [c * 2**level for level in range(arch.depth + 1)]
        self.down = nn.ModuleList([_block(1, widths[0], arch.norm)])
        self.down.extend(_block(widths[i], widths[i + 1], arch.norm) for i in range(arch.depth))
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(arch.depth))
        )
        self.merge = nn.ModuleList(_block(2 * widths[i], widths[i], arch.norm) for i in reversed(range(arch.depth)))
        self.head = nn.Conv2d(widths[0], 1, 1)
        nn.init.zeros_(self.head.weight)  # an untrained network is the identity
        assert self.head.bias is not None
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeeze = x.dim() == 3
        if squeeze:
            x = x[:, None]
        ny, nx = x.shape[-2:]
        m = 2**self.arch.depth
        pad_y, pad_x = (-ny) % m, (-nx) % m
        s = self.arch.intensity_scale_hu
        z = F.pad(x / s, (0, pad_x, 0, pad_y), mode="replicate") if pad_x or pad_y else x / s
        skips = []
        for i, block in enumerate(self.down):
            z = block(z if i == 0 else F.max_pool2d(z, 2))
            skips.append(z)
        skips.pop()
        for up, merge in zip(self.up, self.merge, strict=True):
            z = merge(torch.cat([up(z), skips.pop()], dim=1))
        y = x + s * self.head(z)[..., :ny, :nx]
        return y[:, 0] if squeeze else y


def build_model(arch: Architecture, *, generator: torch.Generator | None = None) -> ResidualUNet:
    """A fresh network; with ``generator`` every weight is drawn from it (Kaiming-uniform), so the same generator
    state gives the same weights whatever else used torch's global generator."""
    model = ResidualUNet(arch)
    if generator is not None:
        for module in model.modules():
            if isinstance(module, nn.Conv2d | nn.ConvTranspose2d) and module is not model.head:
                nn.init.kaiming_uniform_(module.weight, nonlinearity="relu", generator=generator)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
    return model


def batches_of(slices: npt.NDArray[np.floating[Any]], batch_size: int) -> Iterator[npt.NDArray[np.floating[Any]]]:
    """``slices`` ``(n, ny, nx)`` in consecutive batches of ``batch_size`` (views, no copies)."""
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
    return (slices[i : i + batch_size] for i in range(0, slices.shape[0], batch_size))


def recalibrate_statistics(
    model: nn.Module, batches: Iterable[npt.NDArray[np.floating[Any]]], *, device: torch.device
) -> int:
    """Re-estimate every BatchNorm layer's running mean and variance from ``batches`` of HU slices
    ``(b, ny, nx)``: the average over the batches of their batch statistics (``momentum=None``), each layer seeing
    the already re-estimated layers before it; no weight changes, the model's mode and momenta are restored.

    Returns the number of layers re-estimated (0: no BatchNorm; the model is left as it was).

    Raises
    ------
    InvalidInputError
        No batch, or NaN/inf in one.
    """
    layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and m.track_running_stats]
    if not layers:
        return 0
    momenta = [m.momentum for m in layers]
    was_training = model.training
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average of the batch statistics
    model.train()
    seen = 0
    try:
        with torch.no_grad():
            for batch in batches:
                if not np.isfinite(batch).all():
                    raise InvalidInputError("slices hold NaN or inf; cannot estimate BatchNorm statistics")
                model(torch.as_tensor(np.ascontiguousarray(batch, dtype=np.float32), device=device))
                seen += 1
    finally:
        for m, momentum in zip(layers, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
    if seen == 0:
        raise InvalidInputError("no slices to estimate BatchNorm statistics on")
    return len(layers)


@dataclass(frozen=True)
class Checkpoint:
    """A trained network: architecture, the grid ``(ny, nx)`` in pixels it was trained on, weights, and the
    sha256 of the file it came from (the model version stage provenance names)."""

    arch: Architecture
    grid: tuple[int, int]
    state_dict: Mapping[str, torch.Tensor]
    sha256: str
    metadata: Mapping[str, Any]
    #: Digest of BatchNorm statistics re-estimated where the network is used (:meth:`with_statistics_from`);
    #: empty: the file's own.
    statistics: str = ""

    @property
    def site_local_statistics(self) -> bool:
        """The file holds no BatchNorm statistics of its training sites (SiloBN): re-estimate them before use."""
        return self.arch.norm == "batch" and self.metadata.get(BN_STATISTICS_KEY) == "site-local"

    def model(self, *, device: torch.device) -> ResidualUNet:
        """The network with these weights, on ``device``, in eval mode."""
        net = ResidualUNet(self.arch)
        net.load_state_dict(dict(self.state_dict))
        return net.to(device).eval()

    def with_statistics_from(
        self, slices: Iterable[npt.NDArray[np.floating[Any]]], *, device: torch.device
    ) -> Checkpoint:
        """This checkpoint with its BatchNorm statistics re-estimated on ``slices`` (each ``(ny, nx)`` HU, one
        forward pass per slice, so the result does not depend on how callers batch them); the weights and the
        model version (``sha256``) are the file's."""
        net = self.model(device=device)
        recalibrate_statistics(net, (np.asarray(s)[None] for s in slices), device=device)
        state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        digest = hashlib.sha256()
        for key in sorted(state):
            if key.endswith(("running_mean", "running_var")):
                digest.update(state[key].numpy().tobytes())
        return Checkpoint(self.arch, self.grid, state, self.sha256, self.metadata, digest.hexdigest()[:16])


def save_checkpoint(
    path: str | Path,
    model: ResidualUNet,
    *,
    grid: tuple[int, int],
    metadata: Mapping[str, Any] | None = None,
) -> str:
    """Write ``model`` (weights moved to the CPU) with its architecture and grid; returns the file's sha256.

    ``metadata``: JSON-like facts (training target, sites, rounds); never patient data.
    """
    payload = {
        "format": CHECKPOINT_FORMAT,
        "architecture": asdict(model.arch),
        "grid": [int(grid[0]), int(grid[1])],
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "metadata": dict(metadata or {}),
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(target)
    return hashlib.sha256(data).hexdigest()


def load_checkpoint(
    path: str | Path,
    *,
    arch: Architecture | None = None,
    grid: tuple[int, int] | None = None,
) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors only: ``weights_only`` loading).

    Raises
    ------
    StoreNotFoundError
        No file at ``path``.
    InvalidInputError
        Not a fedscan enhance checkpoint; or its architecture or grid differs from ``arch`` / ``grid`` (the
        message names the file, the field and both values); or the weights do not fit the architecture.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError as exc:
        raise StoreNotFoundError(f"enhance model checkpoint {str(p)!r} does not exist") from exc
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for a file that is not a checkpoint
        raise InvalidInputError(f"{str(p)!r} is not a fedscan enhance checkpoint: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise InvalidInputError(f"{str(p)!r} is not a {CHECKPOINT_FORMAT} checkpoint (format {found!r})")
    try:
        found_arch = Architecture(**payload["architecture"])
    except TypeError as exc:
        raise InvalidInputError(f"{str(p)!r}: unknown architecture {payload['architecture']!r}") from exc
    found_grid = (int(payload["grid"][0]), int(payload["grid"][1]))
    if arch is not None and found_arch != arch:
        diff = {k: (v, getattr(arch, k)) for k, v in asdict(found_arch).items() if getattr(arch, k) != v}
        fields = ", ".join(f"{k} {a!r} (expected {b!r})" for k, (a, b) in diff.items())
        raise InvalidInputError(f"checkpoint {str(p)!r} is of another architecture: {fields}")
    if grid is not None and found_grid != tuple(grid):
        raise InvalidInputError(
            f"checkpoint {str(p)!r} was trained on a {found_grid[0]}x{found_grid[1]} grid, "
            f"not the {grid[0]}x{grid[1]} grid asked for"
        )
    state = payload["state_dict"]
    try:
        ResidualUNet(found_arch).load_state_dict(state)
    except RuntimeError as exc:
        raise InvalidInputError(f"checkpoint {str(p)!r}: weights do not fit its architecture: {exc}") from exc
    return Checkpoint(
        arch=found_arch,
        grid=found_grid,
        state_dict=state,
        sha256=hashlib.sha256(data).hexdigest(),
        metadata=dict(payload.get("metadata", {})),
    )


def enhance_slices(
    model: nn.Module,
    slices: npt.NDArray[np.floating[Any]],
    *,
    batch_size: int,
    device: torch.device,
) -> npt.NDArray[np.float32]:
    """Apply ``model`` (in eval mode) to ``(slices, ny, nx)`` HU images, ``batch_size`` slices at a time.

    Parameters
    ----------
    model : torch.nn.Module
        Maps ``(batch, ny, nx)`` to the same shape; already on ``device``.
    slices : numpy.ndarray
        ``(n, ny, nx)``, HU; not modified.
    batch_size : int
        Slices per forward pass (memory, not results: the network is per-slice in eval mode).
    device : torch.device

    Returns
    -------
    numpy.ndarray
        ``(n, ny, nx)`` float32, HU.

    Raises
    ------
    InvalidInputError
        ``slices`` not 3-D, ``batch_size < 1``, or NaN/inf in the input.
    """
    if slices.ndim != 3:
        raise InvalidInputError(f"slices must be (n, ny, nx), got shape {slices.shape}")
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
    if not np.isfinite(slices).all():
        raise InvalidInputError("slices hold NaN or inf; the enhance network needs finite images")
    out = np.empty(slices.shape, dtype=np.float32)
    model.eval()
    with torch.inference_mode():
        for i in range(0, slices.shape[0], batch_size):
            batch = torch.as_tensor(np.ascontiguousarray(slices[i : i + batch_size], dtype=np.float32), device=device)
            out[i : i + batch_size] = model(batch).cpu().numpy()
    return out
