"""The enhance stage's driver: ``volume`` → ``enhanced`` with the trained network, one Dask task per block of
slices (``map_blocks``; a slice needs no neighbour), batched forward passes inside each task, CPU or CUDA, written
chunk by chunk through :meth:`~tasks.storage.ScanStore.run_stage` (a rerun after a fault resumes the blocks not yet
written). Provenance names the model version: the checkpoint's sha256, its architecture and grid. A checkpoint
trained with site-local BatchNorm statistics (SiloBN) carries none of its sites': they are re-estimated on the
scan being enhanced, one slice per pass, before any block runs (so a resumed run uses the same ones).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any

import dask.array as da
import numpy as np
import numpy.typing as npt
import torch
from dask.base import tokenize

from schemas.enhance import EnhanceConfig
from schemas.manifest import DataKind
from schemas.stages import StageName
from tasks.drivers import DEVICE_METRIC, Metrics, psnr_db
from tasks.enhance.model import Checkpoint, ResidualUNet, enhance_slices, load_checkpoint
from tasks.errors import InvalidInputError
from tasks.storage import ScanStore, StageOutput, StageResult

__all__ = ["enhance_scan", "enhance_volume"]

#: Networks built in this process, by (checkpoint sha256, device): every block of every scan reuses one.
_MODELS: dict[tuple[str, str, str], ResidualUNet] = {}
_MODELS_LOCK = threading.Lock()


def _model(checkpoint: Checkpoint, device: torch.device) -> ResidualUNet:
    key = (checkpoint.sha256, checkpoint.statistics, str(device))
    with _MODELS_LOCK:
        model = _MODELS.get(key)
        if model is None:
            model = _MODELS[key] = checkpoint.model(device=device)
            while len(_MODELS) > 4:
                _MODELS.pop(next(iter(_MODELS)))
    return model


def _enhance_block(
    block: npt.NDArray[np.float32], *, checkpoint: Checkpoint, batch_size: int, device: str
) -> npt.NDArray[np.float32]:
    dev = torch.device(device)
    return enhance_slices(_model(checkpoint, dev), block, batch_size=batch_size, device=dev)


def enhance_volume(
    volume: da.Array, checkpoint: Checkpoint, *, batch_slices: int, slice_block: int, device: torch.device
) -> da.Array:
    """Lazy ``(slices, ny, nx)`` HU → enhanced HU, one task per ``slice_block`` slices (no I/O).

    Raises
    ------
    InvalidInputError
        The volume's grid is not the one the checkpoint was trained on (names both).
    """
    if volume.ndim != 3 or tuple(volume.shape[1:]) != checkpoint.grid:
        raise InvalidInputError(
            f"the enhance model {checkpoint.sha256[:12]} was trained on a {checkpoint.grid[0]}x{checkpoint.grid[1]} "
            f"grid; this volume is {tuple(volume.shape)} (slices, y, x)"
        )
    blocks = volume.astype(np.float32).rechunk((slice_block, -1, -1))
    out: da.Array = blocks.map_blocks(
        _enhance_block,
        checkpoint=checkpoint,
        batch_size=batch_slices,
        device=str(device),
        dtype=np.float32,
        name=f"enhance-{tokenize(blocks.name, checkpoint.sha256, batch_slices, str(device))}",
    )
    return out


def _checked_checkpoint(config: EnhanceConfig) -> Checkpoint:
    assert config.model_path is not None  # run_scan_stage never calls a disabled stage's driver
    checkpoint = load_checkpoint(config.model_path)
    if config.model_sha256 is not None and checkpoint.sha256 != config.model_sha256:
        raise InvalidInputError(
            f"enhance model {config.model_path!r} has sha256 {checkpoint.sha256[:12]}…, the config pins "
            f"{config.model_sha256[:12]}…"
        )
    return checkpoint


def _check_units(scan: ScanStore, source: str) -> None:
    units = scan.array(source).attrs.get("units")
    if units == "HU" or (units is None and scan.manifest.data_kind is DataKind.HU_IMAGES):
        return
    raise InvalidInputError(
        f"scan {scan.scan_id!r}: enhance reads HU slices; its {source!r} is in {units!r} "
        "(reconstruct with output_unit: hu)"
    )


def enhance_scan(
    scan: ScanStore,
    config: EnhanceConfig,
    *,
    source: str = "volume",
    inputs: Mapping[str, str],
    device: torch.device,
    force: bool = False,
    progress: Callable[[float], None] | None = None,
) -> StageResult:
    """``volume`` → ``enhanced`` (HU, chunks of ``slice_block`` slices), resumable; provenance names the model."""
    checkpoint = _checked_checkpoint(config)
    _check_units(scan, source)
    volume = scan.read(source)
    # SiloBN: the training sites' statistics stayed there; use this scan's own (enhance_volume names a grid mismatch)
    if checkpoint.site_local_statistics and tuple(volume.shape[1:]) == checkpoint.grid:
        slices = (np.asarray(volume[i].compute(), dtype=np.float32) for i in range(volume.shape[0]))
        checkpoint = checkpoint.with_statistics_from(slices, device=device)
    enhanced = enhance_volume(
        volume, checkpoint, batch_slices=config.batch_slices, slice_block=config.slice_block, device=device
    )
    ny, nx = checkpoint.grid
    has_truth = "volume_truth" in scan.array_names()

    def metrics(s: ScanStore, seconds: float) -> Metrics:
        out: Metrics = {
            DEVICE_METRIC: device.type,
            "source": source,
            "model_sha256": checkpoint.sha256,
            "model_architecture": checkpoint.arch.name,
            "bn_statistics": "this scan's" if checkpoint.statistics else "the model's",
            "slices_per_s": volume.shape[0] / seconds if seconds > 0 else None,
        }
        if has_truth:
            water = s.manifest.water_attenuation_per_mm
            truth = (s.read("volume_truth") - water) / water * 1000.0
            out["psnr_db"] = round(psnr_db(s.read("enhanced"), truth), 3)
            out["source_psnr_db"] = round(psnr_db(s.read(source), truth), 3)
        return out

    attributes: dict[str, Any] = {
        "units": "HU",
        "model_sha256": checkpoint.sha256,
        "model_architecture": asdict(checkpoint.arch),
    }
    return scan.run_stage(
        stage=StageName.ENHANCE,
        config=config,
        inputs=inputs,
        outputs=[
            StageOutput(
                "enhanced",
                enhanced,
                ("slice", "y", "x"),
                (min(config.slice_block, volume.shape[0]), ny, nx),
                attributes,
            )
        ],
        metrics=metrics,
        force=force,  # run_stage asks again under the (scan, stage) lease
        progress=progress,
    )
