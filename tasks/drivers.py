"""Stage drivers: open a scan's Zarr arrays, build the Dask graph around the stage's kernel, write the result
chunk by chunk with provenance (``ScanStore.run_stage``). They use the current Dask scheduler (the flow's
``distributed.Client`` when one is active) and never start a cluster themselves.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path

import dask.array as da
import numpy as np
import numpy.typing as npt
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
def _central(n: int) -> int:
    return max(0, (n - 1) // 2)


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
    """``projections_denoised`` (or ``projections`` when the scan was not denoised) → ``volume``."""
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
        outputs=[StageOutput("volume", volume, ("slice", "y", "x"), None, {"units": unit})],
        metrics=metrics,
        force=force,
        progress=progress,
    )


#: Raw-data FBP slices already computed in this process, newest last: the UI preview and the run report show the
#: same slice, and one FBP of one slice costs about as much as a whole block of them (the back-projection
#: matrices are built per call). Keyed by what the image depends on; a few images of at most 4 MB each.
_RAW_FBP_CACHE: OrderedDict[tuple[str, ...], npt.NDArray[np.float32]] = OrderedDict()
_RAW_FBP_CACHE_SIZE = 16
_RAW_FBP_LOCK = threading.Lock()


def _raw_fbp_key(scan: ScanStore, k: int, filter_name: str, output_unit: str) -> tuple[str, ...] | None:
    ingest = scan.stage_record(StageName.INGEST)
    if ingest is None:  # projections of unknown provenance: never reuse
        return None
    uri = scan.site.uri
    if "://" not in uri:
        uri = str(Path(uri).resolve())
    water = repr(scan.manifest.water_attenuation_per_mm)
    written = ingest.finished_at.isoformat()  # a forced re-ingest with the same config is another image
    return (uri, scan.scan_id, ingest.config_hash, written, str(k), filter_name, output_unit, water)


def raw_central_fbp(scan: ScanStore, k: int, *, filter_name: str, output_unit: str) -> npt.NDArray[np.float32]:
    """FBP of the raw projections' detector row ``k`` (one slice), in ``output_unit``; computed once per
    (scan, ingest, filter, unit) in this process and reused (read-only) by later previews and the report."""
    from tasks.reconstruct.kernels import attenuation_to_hu, fbp

    key = _raw_fbp_key(scan, k, filter_name, output_unit)
    if key is not None:
        with _RAW_FBP_LOCK:
            hit = _RAW_FBP_CACHE.get(key)
            if hit is not None:
                _RAW_FBP_CACHE.move_to_end(key)
                return hit
    geometry = scan.manifest.geometry
    assert geometry is not None
    raw = np.asarray(scan.array("projections")[:, k, :], dtype=np.float32)
    raw_img = np.asarray(fbp(raw[None], geometry, filter_name=filter_name), dtype=np.float32)[0]  # type: ignore[arg-type]
    if output_unit == "hu":
        raw_img = attenuation_to_hu(raw_img, water_attenuation_per_mm=scan.manifest.water_attenuation_per_mm)
    raw_img.setflags(write=False)
    if key is not None:
        with _RAW_FBP_LOCK:
            _RAW_FBP_CACHE[key] = raw_img
            while len(_RAW_FBP_CACHE) > _RAW_FBP_CACHE_SIZE:
                _RAW_FBP_CACHE.popitem(last=False)
    return raw_img


def _central_slices(
    scan: ScanStore, *, filter_name: str, output_unit: str
) -> tuple[int, npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """The central slice index, the FBP of the raw projections there and the stored volume's slice (same unit)."""
    geometry = scan.manifest.geometry
    assert geometry is not None
    k = _central(geometry.n_detector_rows)
    raw_img = raw_central_fbp(scan, k, filter_name=filter_name, output_unit=output_unit)
    return k, raw_img, np.asarray(scan.array("volume")[k], dtype=np.float32)


def reconstruction_preview(scan: ScanStore, config: ReconstructConfig) -> str | None:
    """Markdown with the central slice: raw-data FBP next to the stored (denoised) reconstruction."""
    from tasks.artifacts import montage_png, png_markdown

    if scan.manifest.geometry is None or "volume" not in scan.array_names():
        return None
    k, raw_img, stored = _central_slices(scan, filter_name=config.filter_name, output_unit=config.output_unit)
    label = "denoised" if scan.is_done(StageName.DENOISE) else "stored"
    window = (-200.0, 300.0) if config.output_unit == "hu" else None
    png = montage_png([("raw FBP", raw_img), (f"{label} FBP", stored)], window=window)
    return png_markdown(f"{scan.site.site_id}/{scan.scan_id} slice {k}", png, "Same filter, same window.")


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


def _surrogate_png(scan: ScanStore) -> tuple[int, bytes]:
    from tasks.artifacts import montage_png

    arr = scan.array("surrogate")
    k = _central(arr.shape[0])
    return k, montage_png([("surrogate", np.asarray(arr[k], dtype=np.float32))])


def surrogate_preview(scan: ScanStore) -> str | None:
    """Markdown with the central surrogate slice alone (never beside the private image)."""
    from tasks.artifacts import png_markdown

    if "surrogate" not in scan.array_names():
        return None
    k, png = _surrogate_png(scan)
    return png_markdown(f"{scan.site.site_id}/{scan.scan_id} surrogate, slice {k}", png)


def report_images(data_root: str) -> list[tuple[str, bytes]]:
    """For the local run report: per site, the first reconstructed scan's central slice (truth where known, raw
    FBP, stored FBP, in HU), then its surrogate."""
    from tasks.artifacts import montage_png
    from tasks.reconstruct.kernels import attenuation_to_hu
    from tasks.storage import SiteStore, find_site_stores

    images = []
    for path in find_site_stores(data_root):
        site = SiteStore.open(path, mode="r")
        for scan in site.scans():
            if scan.manifest.geometry is None or not scan.is_done(StageName.RECONSTRUCT):
                continue
            rec = scan.stage_record(StageName.RECONSTRUCT)
            assert rec is not None
            unit = str(rec.config.get("output_unit", "attenuation"))
            k, raw_img, stored = _central_slices(
                scan, filter_name=str(rec.config.get("filter_name", "hann")), output_unit=unit
            )
            water = scan.manifest.water_attenuation_per_mm
            panels = []
            if "volume_truth" in scan.array_names():
                truth = np.asarray(scan.array("volume_truth")[k], dtype=np.float32)
                panels.append(("truth", attenuation_to_hu(truth, water_attenuation_per_mm=water)))
            denoised = scan.is_done(StageName.DENOISE)
            for name, img in (("raw FBP", raw_img), ("denoised FBP" if denoised else "FBP", stored)):
                panels.append((name, img if unit == "hu" else attenuation_to_hu(img, water_attenuation_per_mm=water)))
            images.append((f"{site.site_id}/{scan.scan_id} slice {k}", montage_png(panels, window=(-200.0, 300.0))))
            if "surrogate" in scan.array_names():
                ks, png = _surrogate_png(scan)
                images.append((f"{site.site_id}/{scan.scan_id} surrogate, slice {ks}", png))
            break
    return images
