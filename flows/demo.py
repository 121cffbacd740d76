"""The main job on the embedded default: demo sites → nightly pipeline → report; plus scanner-output files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from flows.pipeline import PipelineReport
from schemas.demo import DemoSize, default_sites
from tasks.demo.build import scan_rng
from tasks.demo.generate import generate_scan
from tasks.scanner_output import ScannerFormat, write_scanner_output

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
    n_slices: int = 8,
    size: DemoSize = DemoSize.SMALL,
    seed: int = 0,
    federated: bool = True,
    console: Console | None = None,
) -> PipelineReport:
    """Demo sites → the ``nightly`` flow (denoise, reconstruct, surrogates, federated round) → this run's
    ``reports/report-<run>.html`` (summary line first)."""
    from flows.pipeline import NightlyRequest, PipelineFailedError, nightly
    from tasks.demo.build import build_demo_sites

    console = console or Console()
    console.print(f"[bold]1/2[/] building {n_sites} demo sites from real CT anatomy under {out}")
    stores = build_demo_sites(
        out,
        n_sites=n_sites,
        scans_per_site=scans_per_site,
        n_slices=n_slices,
        seed=seed,
        size=size,
        keep_counts=True,
    )
    console.print(f"[bold]2/2[/] nightly flow over {len(stores)} sites (Prefect, Dask LocalCluster, Flower simulation)")
    try:
        report = nightly(NightlyRequest(data_root=str(out), federated=federated))
    except PipelineFailedError as exc:  # shown below; the CLI turns report.failed into its exit code
        if exc.report is None:
            raise
        report = exc.report
    table = Table(title="scans")
    for col in ("scan", "ok", "failed stage", "error"):
        table.add_column(col)
    for o in report.scans:
        table.add_row(o.scan, "yes" if o.ok else "NO", o.failed_stage or "", (o.error or "")[:60])
    console.print(table)
    if report.federated:
        fed = report.federated
        rounds = fed.get("rounds") or []
        console.print(f"federated run: {fed.get('status')}, {len(rounds) if isinstance(rounds, list) else 0} rounds")
    if report.summary:
        console.print(report.summary, markup=False, highlight=False)
    if report.report_path:
        console.print(f"report (site-only): {report.report_path}", markup=False, highlight=False)
    from tasks.diagnose.driver import print_predictions

    print_predictions(str(out), None, console)  # every scan of every site, processed in this run or before
    return report
