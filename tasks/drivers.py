"""Stage drivers: open a scan's Zarr arrays, build the Dask graph around the stage's kernel, write the result
chunk by chunk with provenance (``ScanStore.run_stage``). They use the current Dask scheduler (the flow's
``distributed.Client`` when one is active) and never start a cluster themselves.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import dask.array as da
import numpy as np
import torch

from schemas.denoise import DenoiseConfig
from schemas.reconstruct import ReconstructConfig
from schemas.stages import StageName
from schemas.surrogate import SurrogateConfig
from tasks.errors import InvalidInputError
from tasks.storage import ScanStore, StageOutput, StageResult

#: Provenance metric naming where a stage ran ("cpu" / "cuda"): a run setting, never part of the config hash.
DEVICE_METRIC = "device"

Metrics = dict[str, float | int | str | bool | None]


def psnr_db(estimate: da.Array, truth: da.Array) -> float:
    """PSNR against a truth volume (peak = the truth's range), streamed chunk by chunk."""
    mse = float(((estimate.astype(np.float64) - truth) ** 2).mean().compute())
    lo, hi = da.compute(truth.min(), truth.max())
    peak = float(hi - lo)
    return math.inf if mse == 0 else 10.0 * math.log10(peak**2 / mse)


# ------------------------------------------------------------------------------------------------
def denoise_scan(
    scan: ScanStore,
    config: DenoiseConfig,
    *,
    source: str = "projections",
    inputs: Mapping[str, str],
    device: torch.device,
    force: bool = False,
    progress: Callable[[float], None] | None = None,
) -> StageResult:
    """``projections`` → ``projections_denoised`` (same chunks), resumable."""
    from tasks.denoise.chunked import denoise_dask

    manifest = scan.manifest
    target = scan.array(source)
    projections = scan.read(source)
    result, record = denoise_dask(
        projections, config=config, geometry=manifest.geometry, i0_photons=manifest.i0_photons, device=device
    )
    elements = int(np.prod(projections.shape))

    def metrics(_scan: ScanStore, seconds: float) -> Metrics:
        return {
            DEVICE_METRIC: device.type,
            "noise_sigma": float(record.noise_sigma),
            "periodic_views": bool(record.periodic_views),
            "view_halo": int(record.view_halo),
            "elements_per_s": elements / seconds if seconds > 0 else None,
        }

    return scan.run_stage(
        stage=StageName.DENOISE,
        config=config,
        inputs=inputs,
        outputs=[
            StageOutput(
                "projections_denoised",
                result,
                ("view", "row", "col"),
                tuple(target.chunks),
                {"units": "line integral"},
            )
        ],
        metrics=metrics,
        force=force,
        progress=progress,
    )


# ------------------------------------------------------------------------------------------------
def reconstruct_scan(
    scan: ScanStore,
    config: ReconstructConfig,
    *,
    source: str,
    inputs: Mapping[str, str],
    device: torch.device,
    force: bool = False,
    progress: Callable[[float], None] | None = None,
) -> StageResult:
    """``projections_denoised`` (or ``projections`` when the scan was not denoised) → ``volume``, and the raw
    projections' central-slice FBP → ``preview_raw`` (site-only; the previews read it, see tasks/previews.py)."""
    from tasks.previews import raw_preview_output
    from tasks.reconstruct.chunked import reconstruct_with_config

    manifest = scan.manifest
    geometry = manifest.geometry
    if geometry is None:
        raise InvalidInputError(f"scan {scan.scan_id!r} has no geometry; nothing to reconstruct")
    water = manifest.water_attenuation_per_mm
    volume = reconstruct_with_config(scan.read(source), geometry, config, water_attenuation_per_mm=water, device=device)
    has_truth = "volume_truth" in scan.array_names()

    def metrics(s: ScanStore, seconds: float) -> Metrics:
        out: Metrics = {
            DEVICE_METRIC: device.type,
            "source": source,
            "slices_per_s": volume.shape[0] / seconds if seconds > 0 else None,
        }
        if has_truth:
            truth = s.read("volume_truth")
            if config.output_unit == "hu":
                truth = (truth - water) / water * 1000.0
            out["psnr_db"] = round(psnr_db(s.read("volume"), truth), 3)
        return out

    unit = "HU" if config.output_unit == "hu" else "1/mm"
    return scan.run_stage(
        stage=StageName.RECONSTRUCT,
        config=config,
        inputs=inputs,
        outputs=[
            StageOutput("volume", volume, ("slice", "y", "x"), None, {"units": unit}),
            raw_preview_output(
                scan.read("projections"), geometry, config, water_attenuation_per_mm=water, device=device
            ),
        ],
        metrics=metrics,
        force=force,
        progress=progress,
    )


# ------------------------------------------------------------------------------------------------
def surrogate_scan(
    scan: ScanStore,
    config: SurrogateConfig,
    *,
    source: str = "volume",
    inputs: Mapping[str, str],
    device: torch.device,
    force: bool = False,
    progress: Callable[[float], None] | None = None,
) -> StageResult:
    """``volume`` → ``surrogate`` (slice k of the surrogate keeps label k), resumable."""
    from tasks.surrogate.chunked import surrogate_volume

    volume = scan.read(source)
    labels = None
    if "labels" in scan.array_names():
        labels = np.asarray(scan.array("labels")[...])
        if labels.shape != (volume.shape[0],):
            raise InvalidInputError(
                f"scan {scan.scan_id!r}: labels of shape {labels.shape} do not match {volume.shape[0]} slices"
            )
    surrogate = surrogate_volume(volume, config, site_id=scan.site.site_id, labels=labels, device=device)
    return scan.run_stage(
        stage=StageName.SURROGATE,
        config=config,
        inputs=inputs,
        outputs=[StageOutput("surrogate", surrogate, ("slice", "y", "x"), None, {"units": "host intensity"})],
        metrics=lambda _s, seconds: {
            DEVICE_METRIC: device.type,
            "slices_per_s": volume.shape[0] / seconds if seconds > 0 else None,
        },
        force=force,
        progress=progress,
    )
