"""Preview images of a scan's central slice, for the stage cards in the Prefect UI and the run report.

Built from stored arrays only, never by reconstructing again: the reconstruct stage writes the raw projections'
central-slice FBP into the scan as ``preview_raw`` (:func:`raw_preview_output`), the stored reconstruction is read
from ``volume`` and the surrogate from ``surrogate``.

Every image is classed where it is made (:attr:`Preview.plaintext`): a raw or stored reconstruction, or the truth
phantom, is plaintext and stays at the site unless ``FEDSCAN_PRIVACY__SHARE_IMAGES`` is true
(:func:`publishable`); a surrogate is shareable. See docs/privacy.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import dask.array as da
import numpy as np
import numpy.typing as npt
import torch

from schemas.geometry import Geometry
from schemas.reconstruct import ReconstructConfig
from schemas.settings import PrivacySettings
from schemas.stages import StageName
from tasks.artifacts import montage_png, png_markdown
from tasks.storage import ScanStore, SiteStore, StageOutput, find_site_stores

__all__ = [
    "PREVIEW_RAW",
    "Preview",
    "central_index",
    "publishable",
    "raw_preview_output",
    "reconstruction_preview",
    "report_previews",
    "shareable_previews",
    "surrogate_preview",
]

#: The scan's array holding the FBP of the raw projections' central detector row, shape ``(1, ny, nx)``.
PREVIEW_RAW = "preview_raw"

#: The display window of reconstructions in HU: soft tissue.
HU_WINDOW = (-200.0, 300.0)

#: Edge of a preview tile, pixels (``montage_png``'s default tile). The raw preview is reconstructed on a grid no
#: finer than this over the same field of view: back-projection costs grow with the grid's pixels, and a finer
#: image would be shrunk to the tile anyway.
PREVIEW_TILE_PX = 256


@dataclass(frozen=True)
class Preview:
    """One PNG with its title; ``plaintext`` when it shows a (raw, reconstructed or true) image of the scan."""

    title: str
    png: bytes
    plaintext: bool
    caption: str = ""

    def markdown(self) -> str:
        return png_markdown(self.title, self.png, self.caption)


def publishable(preview: Preview | None, policy: PrivacySettings) -> Preview | None:
    """``preview`` when the site's policy lets it leave the worker (shareable, or plaintext with
    ``share_images``), else None."""
    if preview is None or (preview.plaintext and not policy.share_images):
        return None
    return preview


def central_index(n: int) -> int:
    """The central slice of ``n`` (the lower of the two middle ones when ``n`` is even)."""
    return max(0, (n - 1) // 2)


def raw_preview_output(
    projections: da.Array,
    geometry: Geometry,
    config: ReconstructConfig,
    *,
    water_attenuation_per_mm: float,
    device: torch.device,
) -> StageOutput:
    """The reconstruct stage's second output: the FBP (the config's filter and unit) of the raw ``projections``'
    central detector row, lazily, as ``preview_raw`` of shape ``(1, ny, nx)`` — the geometry's grid, or over the
    same field of view with at most :data:`PREVIEW_TILE_PX` pixels a side. Site-only: it is plaintext."""
    from tasks.reconstruct.chunked import reconstruct_volume

    k = central_index(geometry.n_detector_rows)
    grid = geometry.grid
    factor = max(1, math.ceil(max(grid.nx_pixels, grid.ny_pixels) / PREVIEW_TILE_PX))
    coarse = {
        "nx_pixels": max(1, round(grid.nx_pixels / factor)),
        "ny_pixels": max(1, round(grid.ny_pixels / factor)),
        "pixel_size_mm": grid.pixel_size_mm * factor,
    }
    row = Geometry.model_validate(
        {**geometry.model_dump(), "n_detector_rows": 1, "grid": {**grid.model_dump(), **coarse}}
    )
    image = reconstruct_volume(
        projections[:, k : k + 1, :],
        row,
        method="fbp",
        filter_name=config.filter_name,
        frequency_cutoff=config.frequency_cutoff,
        slice_block=1,
        output_unit=config.output_unit,
        water_attenuation_per_mm=water_attenuation_per_mm,
        device=device,
    )
    unit = "HU" if config.output_unit == "hu" else "1/mm"
    attributes = {"units": unit, "slice_index": k, "of": "projections", "site_only": True}
    return StageOutput(PREVIEW_RAW, image, ("slice", "y", "x"), None, attributes)


def _reconstruction_panels(scan: ScanStore) -> tuple[int, str, list[tuple[str, npt.NDArray[np.float32]]]] | None:
    """The central slice index, the volume's unit and the panels: raw FBP (when stored) and the stored slice."""
    if "volume" not in scan.array_names():
        return None
    volume = scan.array("volume")
    unit = str(volume.attrs.get("units", ""))
    names = scan.array_names()
    stored_k = scan.array(PREVIEW_RAW).attrs.get("slice_index") if PREVIEW_RAW in names else None
    k = stored_k if isinstance(stored_k, int) else central_index(volume.shape[0])
    panels = []
    if PREVIEW_RAW in names:  # stores reconstructed before previews were stored have none
        panels.append(("raw FBP", np.asarray(scan.array(PREVIEW_RAW)[0], dtype=np.float32)))
    label = "denoised FBP" if scan.is_done(StageName.DENOISE) else "FBP"
    panels.append((label, np.asarray(volume[k], dtype=np.float32)))
    return k, unit, panels


def reconstruction_preview(scan: ScanStore) -> Preview | None:
    """The central slice: the raw-data FBP next to the stored (denoised) reconstruction. Plaintext."""
    found = _reconstruction_panels(scan)
    if found is None:
        return None
    k, unit, panels = found
    png = montage_png(panels, window=HU_WINDOW if unit == "HU" else None)
    title = f"{scan.site.site_id}/{scan.scan_id} slice {k}"
    return Preview(title, png, plaintext=True, caption="Same filter, same window.")


def surrogate_preview(scan: ScanStore) -> Preview | None:
    """The central surrogate slice alone (never beside the private image). Shareable."""
    if "surrogate" not in scan.array_names():
        return None
    arr = scan.array("surrogate")
    k = central_index(arr.shape[0])
    png = montage_png([("surrogate", np.asarray(arr[k], dtype=np.float32))])
    return Preview(f"{scan.site.site_id}/{scan.scan_id} surrogate, slice {k}", png, plaintext=False)


def _hu(img: npt.NDArray[np.float32], unit: str, water: float) -> npt.NDArray[np.float32]:
    from tasks.reconstruct.kernels import attenuation_to_hu

    return img if unit == "HU" else attenuation_to_hu(img, water_attenuation_per_mm=water)


def report_previews(data_root: str) -> list[Preview]:
    """For the run report: per site, the first reconstructed scan's central slice (truth where known, raw FBP,
    stored FBP, in HU; plaintext), then its surrogate (shareable)."""
    from tasks.reconstruct.kernels import attenuation_to_hu

    previews: list[Preview] = []
    for path in find_site_stores(data_root):
        site = SiteStore.open(path, mode="r")
        for scan in site.scans():
            if not scan.is_done(StageName.RECONSTRUCT):
                continue
            found = _reconstruction_panels(scan)
            if found is None:
                continue
            k, unit, stored = found
            water = scan.manifest.water_attenuation_per_mm
            panels: list[tuple[str, npt.NDArray[np.float32]]] = []
            if "volume_truth" in scan.array_names():
                truth = np.asarray(scan.array("volume_truth")[k], dtype=np.float32)
                panels.append(("truth", attenuation_to_hu(truth, water_attenuation_per_mm=water)))
            panels += [(name, _hu(img, unit, water)) for name, img in stored]
            title = f"{site.site_id}/{scan.scan_id} slice {k}"
            previews.append(Preview(title, montage_png(panels, window=HU_WINDOW), plaintext=True))
            surrogate = surrogate_preview(scan)
            if surrogate is not None:
                previews.append(surrogate)
            break
    return previews


def shareable_previews(previews: Sequence[Preview], policy: PrivacySettings) -> list[Preview]:
    """The previews that may leave the site under ``policy``."""
    return [p for p in previews if publishable(p, policy) is not None]
