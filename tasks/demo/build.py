"""Write the demo sites: one Zarr site store per site through :mod:`tasks.storage`, plus a preview PNG.

Seeds: scan ``j`` of site ``k`` draws from ``SeedSequence(seed, spawn_key=(k, j))`` (the ``j``-th child
of the ``k``-th child of ``SeedSequence(seed)``), so a site's data do not depend on how many sites or
scans are built, nor on the order they are built in.

Each scan is written as one stage, :data:`DEMO_STAGE`, whose provenance records the
:class:`~schemas.demo.DemoScanConfig`; a rerun with the same arguments skips finished scans and
resumes an interrupted one (storage's resumable chunk writes). The stage is named ``ingest`` because
the demo build takes the place of ingesting scanner files: downstream stages see a demo scan exactly
like an ingested one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import dask.array as da
import numpy as np
import numpy.typing as npt

from schemas.demo import DemoScanConfig, DemoSize, SiteProfile, default_sites
from schemas.manifest import DataKind, ScanManifest
from tasks.demo.generate import DemoScan, ScanPlan, plan_scan, scan_from_plan
from tasks.errors import InvalidInputError
from tasks.storage import SiteStore, StageOutput, site_store_uri

DEMO_STAGE = "ingest"
#: Display window of the preview, HU (abdominal soft tissue).
PREVIEW_WINDOW_HU = (-160.0, 240.0)


def scan_rng(seed: int, site_index: int, scan_index: int) -> np.random.Generator:
    """The generator of scan ``scan_index`` of site ``site_index`` under ``seed``."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(site_index, scan_index)))


def _lazy(array: npt.NDArray[np.generic]) -> da.Array:
    lazy: da.Array = da.from_array(array)
    return lazy


def _lesion_records(scan_plan: ScanPlan) -> list[dict[str, object]]:
    return [
        {
            "centre_zyx_mm": [round(v, 4) for v in les.centre_zyx_mm],
            "radii_zyx_mm": [round(v, 4) for v in les.radii_zyx_mm],
            "angle_deg": round(les.angle_deg, 3),
            "lobes_zyxr_mm": [[round(v, 4) for v in lobe] for lobe in les.lobes_zyxr_mm],
            "contrast_hu": round(les.contrast_hu, 3),
            "first_slice": les.first_slice,
            "last_slice": les.last_slice,
        }
        for les in scan_plan.lesions
    ]


def _manifest(config: DemoScanConfig, plan: ScanPlan) -> ScanManifest:
    p = config.profile
    return ScanManifest(
        scan_id=plan.scan_id,
        site_id=p.site_id,
        data_kind=DataKind.COUNTS if config.keep_counts else DataKind.LINE_INTEGRALS,
        geometry=plan.geometry,
        slice_thickness_mm=p.slice_thickness_mm,
        i0_photons=p.i0_photons,
        water_attenuation_per_mm=p.water_attenuation_per_mm,
        # The config's hash identifies the content: another seed under the same scan id is refused.
        source_sha256=hashlib.sha256(config.model_dump_json().encode()).hexdigest(),
        labels={
            "source": "fedscan-demo",
            "anatomy": plan.patient.kind.value,
            "n_lesions": len(plan.lesions),
            "counts_floor_photons": p.counts_floor,
        },
    )


def _outputs(scan: DemoScan, plan: ScanPlan) -> list[StageOutput]:
    outs = [
        StageOutput(
            "projections",
            _lazy(scan.projections),
            ("view", "row", "col"),
            attributes={"units": "line integral", "counts_floor_photons": scan.counts_floor},
        ),
        StageOutput(
            "volume_truth",
            _lazy(scan.volume_truth),
            ("slice", "y", "x"),
            attributes={"units": "1/mm", "water_attenuation_per_mm": scan.water_attenuation_per_mm},
        ),
        StageOutput("labels", _lazy(scan.labels), ("slice",), attributes={"meaning": "1: slice shows a lesion"}),
        StageOutput(
            "lesion_masks",
            _lazy(scan.masks),
            ("slice", "y", "x"),
            attributes={"meaning": "1: lesion", "lesions": _lesion_records(plan)},
        ),
    ]
    if scan.counts is not None:
        outs.insert(
            0,
            StageOutput(
                "counts",
                _lazy(scan.counts),
                ("view", "row", "col"),
                attributes={"units": "photons", "i0_photons": scan.i0_photons},
            ),
        )
    return outs


def _size(size: DemoSize | str | int) -> DemoSize | int:
    if isinstance(size, str):
        try:
            return DemoSize(size)
        except ValueError:
            raise InvalidInputError(
                f"size must be one of {[s.value for s in DemoSize]} or pixels per edge, got {size!r}"
            ) from None
    return int(size)


def build_demo_sites(
    out_dir: str | Path,
    *,
    n_sites: int = 3,
    scans_per_site: int = 2,
    n_slices: int = 8,
    seed: int = 0,
    size: DemoSize | str | int = DemoSize.SMALL,
    preview: bool = False,
    keep_counts: bool = False,
    profiles: Sequence[SiteProfile] | None = None,
) -> list[Path]:
    """Simulate ``n_sites`` sites and write one site store each under ``out_dir``.

    Parameters
    ----------
    out_dir : str or Path
        Folder; site ``X`` goes to ``<out_dir>/X.zarr`` (created or reopened).
    n_sites, scans_per_site, n_slices : int
        How many sites, scans per site, slices per scan.
    seed : int
        Root seed; same arguments → same bytes.
    size : DemoSize, str or int
        Grid preset (``tiny`` 32², ``small`` 64², ``medium`` 256², ``full`` 512²) or pixels per edge;
        views and detector columns scale with it.
    preview : bool
        Also write ``<out_dir>/preview.png`` (see :func:`preview_montage`).
    keep_counts : bool
        Store raw detector counts (array ``counts``, data kind ``counts``) beside the line integrals.
    profiles : sequence of SiteProfile, optional
        Sites to build instead of ``default_sites(n_sites)`` (``n_sites`` is then their number).

    Returns
    -------
    list of Path
        The site stores, in site order.
    """
    if scans_per_site < 1 or n_slices < 1 or seed < 0:
        raise InvalidInputError(
            f"scans_per_site ({scans_per_site}) and n_slices ({n_slices}) must be >= 1, seed ({seed}) >= 0"
        )
    sites = tuple(profiles) if profiles is not None else default_sites(n_sites)
    if not sites:
        raise InvalidInputError("no site profiles to build")
    size_key = _size(size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stores: list[Path] = []
    previews: list[DemoScan] = []
    for k, profile in enumerate(sites):
        grid = profile.grid(size_key)
        path = Path(site_store_uri(out, profile.site_id))
        site = SiteStore.open_or_create(path, site_id=profile.site_id)
        for j in range(scans_per_site):
            config = DemoScanConfig(
                profile=profile,
                grid_pixels=grid.nx_pixels,
                n_slices=n_slices,
                seed=seed,
                site_index=k,
                scan_index=j,
                keep_counts=keep_counts,
            )
            plan = plan_scan(
                profile,
                n_slices=n_slices,
                grid=grid,
                rng=scan_rng(seed, k, j),
                scan_id=f"{profile.site_id}-{j:04d}",
            )
            scan_store = site.create_scan(_manifest(config, plan))
            wants_preview = preview and j == 0
            if scan_store.is_done(DEMO_STAGE, config.config_hash()) and not wants_preview:
                continue
            scan = scan_from_plan(plan, keep_counts=keep_counts)
            scan_store.run_stage(stage=DEMO_STAGE, config=config, outputs=_outputs(scan, plan))
            if wants_preview:
                previews.append(scan)
        stores.append(path)
    if preview:
        preview_montage(previews, out / "preview.png")
    return stores


def _window(hu: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]:
    lo, hi = PREVIEW_WINDOW_HU
    return np.asarray(np.clip((hu - lo) / (hi - lo) * 255.0, 0, 255).round(), dtype=np.uint8)


def preview_montage(scans: Sequence[DemoScan], path: str | Path, *, tile_pixels: int = 256) -> Path:
    """A PNG with one column per scan: truth (top) and FBP of the noisy projections (bottom).

    The central slice of each scan, reconstructed with fedscan's FBP (Hann filter), shown in the window
    :data:`PREVIEW_WINDOW_HU` and labelled with the site, beam, views and photons per view.

    Parameters
    ----------
    scans : sequence of DemoScan
        Typically the first scan of each site.
    path : str or Path
        Where to write the PNG.
    tile_pixels : int
        Edge of each tile, pixels (images are resized to it).
    """
    import torch
    from PIL import Image, ImageDraw

    from tasks.reconstruct.kernels import attenuation_to_hu, fbp

    if not scans:
        raise InvalidInputError("preview_montage needs at least one scan")
    label_h = 14
    sheet = Image.new("L", (tile_pixels * len(scans), 2 * tile_pixels + 2 * label_h), color=0)
    draw = ImageDraw.Draw(sheet)
    for i, scan in enumerate(scans):
        k = scan.volume_truth.shape[0] // 2
        sino = np.ascontiguousarray(scan.projections[:, k : k + 1, :].transpose(1, 0, 2))
        rec = np.asarray(fbp(sino, scan.geometry, filter_name="hann", device=torch.device("cpu")))[0]
        w = scan.water_attenuation_per_mm
        for row, image in enumerate((scan.volume_truth[k], rec)):
            tile = Image.fromarray(_window(attenuation_to_hu(image, water_attenuation_per_mm=w)))
            tile = tile.resize((tile_pixels, tile_pixels), Image.Resampling.BILINEAR)
            sheet.paste(tile, (i * tile_pixels, label_h + row * (tile_pixels + label_h)))
        g = scan.geometry
        beam = g.beam.value if not g.is_fan else f"fan-{g.detector_shape.value}"
        draw.text((i * tile_pixels + 2, 1), f"{scan.site_id} truth, slice {k}, {scan.anatomy}", fill=255)
        draw.text(
            (i * tile_pixels + 2, tile_pixels + label_h + 1),
            f"FBP {beam} {g.n_views}v I0={scan.i0_photons:.0e}",
            fill=255,
        )
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(target)
    return target
