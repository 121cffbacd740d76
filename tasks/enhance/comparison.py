"""The enhance stage's picture for the site-only run report: one slice as raw FBP, classical (the view-similarity
denoiser + FBP, i.e. the stored reconstruction) and enhanced side by side, same window, truth first where known.

Built from stored arrays only. Every panel is plaintext (:attr:`tasks.previews.Preview.plaintext`), so the run
summary that may leave the site drops it unless the site's policy shares images (docs/privacy.md).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from schemas.stages import StageName
from tasks.artifacts import montage_png
from tasks.previews import HU_WINDOW, PREVIEW_RAW, Preview, central_index
from tasks.storage import ScanStore, SiteStore, find_site_stores

__all__ = ["enhance_comparison", "enhance_comparisons"]

FloatArray = npt.NDArray[np.float32]


def _psnr_db(image: FloatArray, truth: FloatArray) -> float:
    mse = float(np.mean((image.astype(np.float64) - truth) ** 2))
    peak = float(truth.max() - truth.min())
    return float("inf") if mse == 0 else 10.0 * np.log10(peak**2 / mse)


def enhance_comparison(scan: ScanStore) -> Preview | None:
    """Raw FBP / classical / enhanced of the scan's preview slice (HU); None before the enhance stage ran.

    The caption gives each panel's PSNR against the truth where the scan has one (demo data) and the panel is on
    the truth's grid (the raw FBP preview may be coarser)."""
    names = scan.array_names()
    if "enhanced" not in names or not scan.is_done(StageName.ENHANCE):
        return None
    enhanced = scan.array("enhanced")
    stored_k = scan.array(PREVIEW_RAW).attrs.get("slice_index") if PREVIEW_RAW in names else None
    k = stored_k if isinstance(stored_k, int) else central_index(enhanced.shape[0])
    panels: list[tuple[str, FloatArray]] = []
    truth: FloatArray | None = None
    if "volume_truth" in names:
        water = scan.manifest.water_attenuation_per_mm
        mu = np.asarray(scan.array("volume_truth")[k], dtype=np.float32)
        truth = ((mu - water) / water * 1000.0).astype(np.float32)
        panels.append(("truth", truth))
    if PREVIEW_RAW in names and scan.array(PREVIEW_RAW).attrs.get("units") == "HU":
        panels.append(("raw FBP", np.asarray(scan.array(PREVIEW_RAW)[0], dtype=np.float32)))
    if "volume" in names:
        label = "classical (denoised FBP)" if scan.is_done(StageName.DENOISE) else "FBP"
        panels.append((label, np.asarray(scan.array("volume")[k], dtype=np.float32)))
    panels.append(("enhanced", np.asarray(enhanced[k], dtype=np.float32)))
    caption = "Same window (HU)."
    if truth is not None:
        scores = [f"{name} {_psnr_db(img, truth):.1f} dB" for name, img in panels[1:] if img.shape == truth.shape]
        caption += " PSNR against the truth: " + ", ".join(scores) + "."
    title = f"{scan.site.site_id}/{scan.scan_id} slice {k}: raw / classical / enhanced"
    return Preview(title, montage_png(panels, window=HU_WINDOW), plaintext=True, caption=caption)


def enhance_comparisons(data_root: str) -> list[Preview]:
    """One :func:`enhance_comparison` per site: its first scan the enhance stage has run on."""
    out: list[Preview] = []
    for path in find_site_stores(data_root):
        site = SiteStore.open(path, mode="r")
        for scan in site.scans():
            preview = enhance_comparison(scan)
            if preview is not None:
                out.append(preview)
                break
    return out
