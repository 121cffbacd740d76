"""Stage drivers: open a scan's Zarr arrays, build the Dask graph around the stage's kernel, write the result
chunk by chunk with provenance (``ScanStore.run_stage``). They use the current Dask scheduler (the flow's
``distributed.Client`` when one is active) and never start a cluster themselves.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import dask.array as da
import numpy as np

from schemas.denoise import DenoiseConfig
from schemas.manifest import DataKind
from schemas.reconstruct import ReconstructConfig
from schemas.surrogate import SurrogateConfig
from tasks.errors import InvalidInputError, StageIncompleteError
from tasks.storage import ScanStore, StageOutput, StageResult

INGEST = "ingest"
DENOISE = "denoise"
RECONSTRUCT = "reconstruct"
SURROGATE = "surrogate"


def _upstream(scan: ScanStore, stage: str) -> dict[str, str]:
    rec = scan.stage_record(stage)
    if rec is None:
        raise StageIncompleteError(f"scan {scan.scan_id!r} of site {scan.site.site_id!r}: stage {stage!r} is not done")
    return {stage: rec.config_hash}


def _skip_if_done(scan: ScanStore, stage: str, config_hash: str, inputs: Mapping[str, str]) -> StageResult | None:
    if scan.is_done(stage, config_hash, inputs):
        rec = scan.stage_record(stage)
        assert rec is not None
        return StageResult(record=rec, skipped=True, chunks_written=0, chunks_present=0)
    return None


def psnr_db(estimate: da.Array, truth: da.Array) -> float:
    """PSNR against a truth volume (peak = the truth's range), streamed chunk by chunk."""
    mse = float(((estimate.astype(np.float64) - truth) ** 2).mean().compute())
    lo, hi = da.compute(truth.min(), truth.max())
    peak = float(hi - lo)
    return math.inf if mse == 0 else 10.0 * math.log10(peak**2 / mse)


# ------------------------------------------------------------------------------------------------
def denoise_scan(
    scan: ScanStore, config: DenoiseConfig, *, force: bool = False, progress: Callable[[float], None] | None = None
) -> StageResult:
    """``projections`` → ``projections_denoised`` (same chunks), resumable."""
    from tasks.denoise.chunked import denoise_dask

    inputs = _upstream(scan, INGEST)
    if not force and (done := _skip_if_done(scan, DENOISE, config.config_hash(), inputs)):
        return done
    manifest = scan.manifest
    if manifest.data_kind is DataKind.HU_IMAGES:
        raise InvalidInputError(f"scan {scan.scan_id!r} holds images only; there are no projections to denoise")
    target = scan.array("projections")
    projections = scan.read("projections")
    result, record = denoise_dask(
        projections, config=config, geometry=manifest.geometry, i0_photons=manifest.i0_photons
    )
    elements = int(np.prod(projections.shape))

    def metrics(_scan: ScanStore, seconds: float) -> dict[str, float | int | str | bool | None]:
        return {
            "noise_sigma": float(record.noise_sigma),
            "periodic_views": bool(record.periodic_views),
            "view_halo": int(record.view_halo),
            "elements_per_s": elements / seconds if seconds > 0 else None,
        }

    return scan.run_stage(
        stage=DENOISE,
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
    scan: ScanStore, config: ReconstructConfig, *, force: bool = False, progress: Callable[[float], None] | None = None
) -> StageResult:
    """``projections_denoised`` (or ``projections`` when the scan was not denoised) → ``volume``, and the raw
    projections' central-slice FBP → ``preview_raw`` (site-only; the previews read it, see tasks/previews.py)."""
    from tasks.previews import raw_preview_output
    from tasks.reconstruct.chunked import reconstruct_with_config

    source = "projections_denoised" if scan.is_done(DENOISE) else "projections"
    inputs = _upstream(scan, DENOISE if source == "projections_denoised" else INGEST)
    if not force and (done := _skip_if_done(scan, RECONSTRUCT, config.config_hash(), inputs)):
        return done
    manifest = scan.manifest
    geometry = manifest.geometry
    if geometry is None:
        raise InvalidInputError(f"scan {scan.scan_id!r} has no geometry; nothing to reconstruct")
    water = manifest.water_attenuation_per_mm
    volume = reconstruct_with_config(scan.read(source), geometry, config, water_attenuation_per_mm=water)
    has_truth = "volume_truth" in scan.array_names()

    def metrics(s: ScanStore, seconds: float) -> dict[str, float | int | str | bool | None]:
        out: dict[str, float | int | str | bool | None] = {
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
        stage=RECONSTRUCT,
        config=config,
        inputs=inputs,
        outputs=[
            StageOutput("volume", volume, ("slice", "y", "x"), None, {"units": unit}),
            raw_preview_output(scan.read("projections"), geometry, config, water_attenuation_per_mm=water),
        ],
        metrics=metrics,
        force=force,
        progress=progress,
    )


# ------------------------------------------------------------------------------------------------
def surrogate_scan(
    scan: ScanStore, config: SurrogateConfig, *, force: bool = False, progress: Callable[[float], None] | None = None
) -> StageResult:
    """``volume`` → ``surrogate`` (slice k of the surrogate keeps label k), resumable."""
    from tasks.surrogate.chunked import surrogate_volume

    inputs = _upstream(scan, RECONSTRUCT) if scan.is_done(RECONSTRUCT) else _upstream(scan, INGEST)
    if not force and (done := _skip_if_done(scan, SURROGATE, config.config_hash(), inputs)):
        return done
    volume = scan.read("volume")
    labels = None
    if "labels" in scan.array_names():
        labels = np.asarray(scan.array("labels")[...])
        if labels.shape != (volume.shape[0],):
            raise InvalidInputError(
                f"scan {scan.scan_id!r}: labels of shape {labels.shape} do not match {volume.shape[0]} slices"
            )
    surrogate = surrogate_volume(volume, config, site_id=scan.site.site_id, labels=labels)
    return scan.run_stage(
        stage=SURROGATE,
        config=config,
        inputs=inputs,
        outputs=[StageOutput("surrogate", surrogate, ("slice", "y", "x"), None, {"units": "host intensity"})],
        metrics=lambda _s, seconds: {"slices_per_s": volume.shape[0] / seconds if seconds > 0 else None},
        force=force,
        progress=progress,
    )
