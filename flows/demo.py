"""The main job on the embedded default: demo scanner output for several sites → ingest → summary."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from flows.ingest import IngestRequest, ingest_scans
from schemas.demo import DemoSize, default_sites
from tasks.demo.build import scan_rng
from tasks.demo.generate import generate_scan
from tasks.scanner_output import ScannerFormat, write_scanner_output
from tasks.storage import SiteStore, site_store_uri

#: Each site hands its data over differently, as real sites do.
FORMATS = (ScannerFormat.NPY_COUNTS, ScannerFormat.TIFF, ScannerFormat.TIFF_SERIES)


@dataclass(frozen=True)
class SiteSummary:
    site_id: str
    store: str
    scans: int
    geometry: str
    i0_photons: float
    file_format: str


def make_scanner_output(
    out: Path, *, n_sites: int, scans_per_site: int, n_slices: int, size: DemoSize, seed: int
) -> dict[str, list[Path]]:
    """Simulate each site's scans and write them as scanner files under ``out/incoming/<site>/``."""
    sources: dict[str, list[Path]] = {}
    for i, profile in enumerate(default_sites(n_sites)):
        for k in range(scans_per_site):
            scan = generate_scan(
                profile,
                n_slices=n_slices,
                grid=profile.grid(size),
                rng=scan_rng(seed, i, k),
                scan_id=f"{profile.site_id}-scan{k:03d}",
                keep_counts=True,
            )
            path = write_scanner_output(
                out / "incoming" / profile.site_id,
                scan_id=scan.scan_id,
                geometry=scan.geometry,
                line_integrals=scan.projections,
                counts=scan.counts,
                i0_photons=scan.i0_photons,
                water_attenuation_per_mm=scan.water_attenuation_per_mm,
                fmt=FORMATS[i % len(FORMATS)],
            )
            sources.setdefault(profile.site_id, []).append(path)
    return sources


def run_demo(
    out: Path,
    *,
    n_sites: int = 3,
    scans_per_site: int = 2,
    n_slices: int = 4,
    size: DemoSize = DemoSize.SMALL,
    seed: int = 0,
    console: Console | None = None,
) -> list[SiteSummary]:
    console = console or Console()
    console.print(f"[bold]1/2[/] simulating scanner output of {n_sites} sites under {out / 'incoming'}")
    sources = make_scanner_output(
        out, n_sites=n_sites, scans_per_site=scans_per_site, n_slices=n_slices, size=size, seed=seed
    )
    data_root = str(out / "stores")
    console.print(f"[bold]2/2[/] ingesting into {data_root} (Prefect flow 'ingest-scans')")
    summaries = []
    for i, (site_id, paths) in enumerate(sources.items()):
        ingest_scans(IngestRequest(site_id=site_id, sources=tuple(paths), data_root=data_root))
        site = SiteStore.open(site_store_uri(data_root, site_id), mode="r")
        m = site.scans()[0].manifest
        g = m.geometry
        assert g is not None
        summaries.append(
            SiteSummary(
                site_id=site_id,
                store=site.uri,
                scans=len(site.scan_ids()),
                geometry=f"{g.beam.value}{'/' + g.detector_shape.value if g.is_fan else ''}, {g.n_views} views, "
                f"{g.n_detector_cols} cols, {g.n_detector_rows} rows",
                i0_photons=float(m.i0_photons or 0),
                file_format=FORMATS[i % len(FORMATS)].value,
            )
        )
    table = Table(title="demo sites")
    for col in ("site", "scans", "geometry", "I0 (photons/bin)", "handed over as", "store"):
        table.add_column(col)
    for s in summaries:
        table.add_row(s.site_id, str(s.scans), s.geometry, f"{s.i0_photons:.3g}", s.file_format, s.store)
    console.print(table)
    return summaries
