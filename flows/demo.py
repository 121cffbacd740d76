"""The main job on the embedded default: demo sites → nightly pipeline → report; plus scanner-output files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from flows.pipeline import PipelineReport
from schemas.demo import DemoSize, default_sites
from schemas.federation import FederatedTask, FederationConfig
from schemas.pipeline import PipelineConfig
from tasks.demo.build import scan_rng
from tasks.demo.generate import generate_scan
from tasks.errors import FedscanError
from tasks.scanner_output import ScannerFormat, write_scanner_output

#: ``fedscan demo --enhance``'s training: few rounds and a narrow network, sized for the demo's 64² sites on a CPU.
ENHANCE_TRAINING = FederationConfig(
    task=FederatedTask.ENHANCE, num_rounds=3, local_epochs=1, batch_size=8, base_channels=8, round_timeout_s=600.0
)


class DemoEnhanceError(FedscanError):
    """The demo's enhance training did not complete; nothing is applied."""


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
    enhance: bool = False,
    console: Console | None = None,
) -> PipelineReport:
    """Demo sites → the ``nightly`` flow (denoise, reconstruct, surrogates, federated round) → this run's
    ``reports/report-<run>.html`` (summary line first).

    ``enhance``: first the sites train the enhance network together (the ``federated-training`` flow with
    :data:`ENHANCE_TRAINING`, on their projections only), then the nightly runs with ``enhance.model_path`` (and
    its sha256 pinned) naming ``models/enhance-current.pt``: every scan goes reconstruct → enhance → surrogate,
    and the site-only report shows raw FBP / classical / enhanced. Training first costs one nightly, not two:
    the surrogates and the lesion round are computed once, from the enhanced volumes."""
    from flows.pipeline import NightlyRequest, PipelineFailedError, nightly
    from tasks.demo.build import build_demo_sites

    console = console or Console()
    steps = 3 if enhance else 2
    console.print(f"[bold]1/{steps}[/] building {n_sites} demo sites from real CT anatomy under {out}")
    stores = build_demo_sites(
        out,
        n_sites=n_sites,
        scans_per_site=scans_per_site,
        n_slices=n_slices,
        seed=seed,
        size=size,
        keep_counts=True,
    )
    config = PipelineConfig()
    if enhance:
        console.print(f"[bold]2/{steps}[/] federated training of the enhance network over {len(stores)} sites")
        config = _train_enhance(out, len(stores), console)
    what = "Prefect, Dask LocalCluster, Flower simulation" + (", enhance stage on" if enhance else "")
    console.print(f"[bold]{steps}/{steps}[/] nightly flow over {len(stores)} sites ({what})")
    try:
        report = nightly(NightlyRequest(data_root=str(out), config=config, federated=federated))
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
    if enhance:
        console.print(f"enhance model: {config.enhance.model_path}", markup=False, highlight=False)
    if report.report_path:
        what = "site-only; raw FBP / classical / enhanced per site" if enhance else "site-only"
        console.print(f"report ({what}): {report.report_path}", markup=False, highlight=False)
    from tasks.diagnose.driver import print_predictions

    print_predictions(str(out), None, console)  # every scan of every site, processed in this run or before
    return report


def _train_enhance(out: Path, n_sites: int, console: Console) -> PipelineConfig:
    """The ``federated-training`` flow with :data:`ENHANCE_TRAINING` over the demo sites; the pipeline config
    that applies its model (path and sha256 pinned, so a retrained model recomputes the stage)."""
    from flows.federated import FederatedRequest, federated_training
    from tasks.enhance.model import load_checkpoint
    from tasks.federated.enhance_task import CURRENT_CHECKPOINT

    config = FederationConfig.model_validate({**ENHANCE_TRAINING.model_dump(), "min_available_clients": n_sites})
    fed = federated_training(FederatedRequest(data_root=str(out), config=config))
    current = (out / "models" / CURRENT_CHECKPOINT).resolve()
    if fed.status != "finished:completed" or not current.is_file():
        raise DemoEnhanceError(f"the enhance network's federated run ended {fed.status!r}; no {current} to apply")
    psnr = [r.eval_psnr_db for r in fed.rounds if r.eval_psnr_db is not None]
    sha = load_checkpoint(current).sha256
    console.print(
        f"enhance network: {len(fed.rounds)} rounds in {fed.wall_seconds:.0f} s"
        + (f", held-out PSNR {psnr[0]:.1f} → {psnr[-1]:.1f} dB" if psnr else "")
        + f"; model {current} (sha256 {sha[:12]}…)",
        markup=False,
        highlight=False,
    )
    return PipelineConfig.model_validate({"enhance": {"model_path": str(current), "model_sha256": sha}})
