"""The ``fedscan`` command line.

Errors print one line naming the input and the problem and exit non-zero; ``--debug`` shows the traceback.
Exit codes: 0 ok, 1 unexpected failure, 2 bad input or store, 3 already ingested.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from schemas.geometry import BeamKind, DetectorShape
from schemas.ids import IdKind, validate_id
from schemas.ingest import GeometrySpec, IngestSidecar
from schemas.manifest import DataKind
from schemas.pipeline import ConfigFileError, PipelineConfig
from schemas.settings import get_settings
from tasks.errors import AlreadyIngestedError, FedscanError, InvalidInputError
from tasks.sources import describe_readers

app = typer.Typer(
    name="fedscan",
    help="Privacy-preserving CT pipeline: ingest, denoise, reconstruct, surrogate, federate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

_state = {"debug": False}

F = TypeVar("F", bound=Callable[..., Any])

EXIT_INPUT = 2
EXIT_ALREADY = 3


def fail(message: str, code: int = EXIT_INPUT) -> typer.Exit:
    err_console.print(f"fedscan: error: {message}", markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(code)


def friendly_errors(func: F) -> F:
    """Turn fedscan's errors into one clear line and an exit code (traceback only with --debug)."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except AlreadyIngestedError as exc:
            if _state["debug"]:
                raise
            raise fail(str(exc), EXIT_ALREADY) from None
        except (FedscanError, ConfigFileError, ValidationError, OSError) as exc:
            if _state["debug"]:
                raise
            msg = str(exc).splitlines()[0] if isinstance(exc, ValidationError) else str(exc)
            raise fail(msg) from None

    return wrapper  # type: ignore[return-value]


@app.callback()
def main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    """fedscan: privacy-preserving CT pipeline."""
    _state["debug"] = debug


# ------------------------------------------------------------------------------------------------
@app.command()
@friendly_errors
def ingest(
    path: Annotated[Path, typer.Argument(help=f"A scanner file or a folder of views/slices. {describe_readers()}.")],
    site: Annotated[str, typer.Option("--site", help="Site id (the store is <store>/<site>.zarr).")],
    store: Annotated[
        str | None, typer.Option("--store", help="Data root holding the site stores; default FEDSCAN_DATA_ROOT.")
    ] = None,
    geometry_file: Annotated[
        Path | None, typer.Option("--geometry", help="YAML sidecar (default: <source>.yaml or fedscan.yaml).")
    ] = None,
    scan_id: Annotated[
        str | None,
        typer.Option("--scan-id", help="Scan id; must not look like identity (default: keyed, never the file name)."),
    ] = None,
    beam: Annotated[BeamKind | None, typer.Option(help="parallel | fan (overrides the sidecar).")] = None,
    detector_shape: Annotated[DetectorShape | None, typer.Option(help="flat | curved.")] = None,
    angular_range_deg: Annotated[float | None, typer.Option(help="Angular span of the views, degrees.")] = None,
    detector_pitch_mm: Annotated[float | None, typer.Option(help="Detector column pitch, mm.")] = None,
    sid_mm: Annotated[float | None, typer.Option("--sid-mm", help="Source to isocentre, mm (fan).")] = None,
    sdd_mm: Annotated[float | None, typer.Option("--sdd-mm", help="Source to detector, mm (fan).")] = None,
    data_kind: Annotated[DataKind | None, typer.Option(help="counts | line_integrals.")] = None,
    i0: Annotated[float | None, typer.Option("--i0", help="Unattenuated photons per bin (counts).")] = None,
    skip_existing: Annotated[
        bool, typer.Option("--skip-existing", help="Exit 0 when the source was already ingested.")
    ] = False,
) -> None:
    """Validate a scan and write it into its site's Zarr store (the source is never modified)."""
    validate_id(IdKind.SITE, site, error=InvalidInputError)  # before anything forms a path from it
    from tasks.ingest import find_sidecar, load_sidecar
    from tasks.ingest import ingest as run_ingest
    from tasks.storage import SiteStore, site_store_uri

    sidecar_path = geometry_file or find_sidecar(path)
    sidecar = load_sidecar(sidecar_path) if sidecar_path is not None else IngestSidecar()
    overrides = {
        k: v
        for k, v in {
            "beam": beam,
            "detector_shape": detector_shape,
            "angular_range_deg": angular_range_deg,
            "detector_pitch_mm": detector_pitch_mm,
            "source_to_isocenter_mm": sid_mm,
            "source_to_detector_mm": sdd_mm,
        }.items()
        if v is not None
    }
    if overrides:
        base = (sidecar.geometry or GeometrySpec()).model_dump()
        sidecar = sidecar.model_copy(update={"geometry": GeometrySpec.model_validate({**base, **overrides})})
    top = {k: v for k, v in {"data_kind": data_kind, "i0_photons": i0}.items() if v is not None}
    if top:
        sidecar = IngestSidecar.model_validate({**sidecar.model_dump(), **top})
    root = store if store is not None else get_settings().data_root
    site_store = SiteStore.open_or_create(site_store_uri(root, site), site_id=site)
    try:
        res = run_ingest(path, site=site_store, sidecar=sidecar, scan_id=scan_id)
    except AlreadyIngestedError as exc:
        if skip_existing:
            err_console.print(f"fedscan: {exc}", markup=False, highlight=False)
            return
        raise
    done = res.result
    state = "resumed" if done.chunks_present else "written"
    console.print(
        f"ingested {path} → {res.store} scan [bold]{res.scan_id}[/] "
        f"({', '.join(res.arrays)}; {done.chunks_written} chunks {state})"
    )


# ------------------------------------------------------------------------------------------------
def _chain_line(scan: Any, prov: dict[str, Any]) -> str:
    """Each registry stage's state for this scan: done, pending or not applicable to its data kind."""
    from schemas.stages import PIPELINE

    kind = scan.manifest.data_kind
    parts = []
    for spec in PIPELINE:
        state = "not-applicable" if not spec.applies_to(kind) else ("done" if spec.name in prov else "pending")
        parts.append(f"{spec.name.value} {state}")
    return ", ".join(parts)


def _format_shape(shape: tuple[int, ...]) -> str:
    return "×".join(str(s) for s in shape)


@app.command()
@friendly_errors
def inspect(
    store: Annotated[Path, typer.Argument(help="A site store (<site>.zarr) or a folder of site stores.")],
) -> None:
    """Print sites, scans, arrays, shapes, stages done and their provenance."""
    from tasks.storage import SiteStore, find_site_stores

    if store.is_dir() and store.suffix != ".zarr" and not (store / "zarr.json").exists():
        paths = find_site_stores(store)
        if not paths:
            raise fail(f"{store}: no fedscan site stores (*.zarr) in this folder")
    else:
        paths = [store]
    for p in paths:
        site = SiteStore.open(p, mode="r")
        scans = site.scans()
        console.print(f"[bold]site {site.site_id}[/]  {p}  ({len(scans)} scans)")
        for scan in scans:
            m = scan.manifest
            geo = m.geometry
            desc = (
                f"{geo.beam.value}-beam"
                + (f" ({geo.detector_shape.value})" if geo.is_fan else "")
                + f", {geo.n_views} views over {geo.angular_range_deg:g}°"
                if geo
                else "images only"
            )
            dose = f", I0={m.i0_photons:.3g}" if m.i0_photons else ""
            console.print(f"  scan [bold]{scan.scan_id}[/]  {m.data_kind.value}; {desc}{dose}")
            table = Table(box=None, show_header=True, pad_edge=False)
            for col in ("array", "dims", "shape", "chunks", "dtype", "written"):
                table.add_column(col)
            from tasks.storage import missing_chunks

            for name in scan.array_names():
                arr = scan.array(name)
                dims = ",".join(str(d) for d in getattr(arr.metadata, "dimension_names", None) or ())
                nchunks = arr.nchunks
                left = missing_chunks(arr)
                table.add_row(
                    name,
                    dims,
                    _format_shape(arr.shape),
                    _format_shape(arr.chunks),
                    str(arr.dtype),
                    f"{nchunks - left}/{nchunks}",
                )
            console.print(table)
            prov = scan.provenance()
            console.print(f"    chain: {_chain_line(scan, prov)}", highlight=False)
            if not prov:
                console.print("    stages done: none")
            for stage, rec in prov.items():
                metrics = ", ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.metrics.items()
                )
                console.print(
                    f"    stage [green]{stage}[/] done  config {rec.config_hash}  {rec.seconds:.2f}s  "
                    f"code {rec.code_version}  finished {rec.finished_at:%Y-%m-%d %H:%M:%S}Z",
                    highlight=False,
                )
                if metrics:
                    console.print(f"      {metrics}", markup=False, highlight=False)


# ------------------------------------------------------------------------------------------------
@app.command("demo-data")
@friendly_errors
def demo_data(
    out: Annotated[Path, typer.Option("--out", help="Folder for the site stores (<site>.zarr).")],
    sites: Annotated[int, typer.Option("--sites", min=1, max=26, help="Number of sites.")] = 3,
    scans_per_site: Annotated[int, typer.Option("--scans-per-site", min=1, help="Scans per site.")] = 2,
    slices: Annotated[int, typer.Option("--slices", min=1, help="Slices (detector rows) per scan.")] = 8,
    seed: Annotated[int, typer.Option("--seed", help="Random seed; same seed, same bytes.")] = 0,
    size: Annotated[str, typer.Option("--size", help="tiny (32²) | small (64²) | medium (256²) | full (512²).")] = (
        "small"
    ),
    counts: Annotated[bool, typer.Option("--counts/--no-counts", help="Also store raw detector counts.")] = True,
    preview: Annotated[bool, typer.Option("--preview", help="Write preview.png (truth vs noisy FBP).")] = False,
) -> None:
    """Simulate several heterogeneous sites from real CT anatomy, with ground truth and lesion labels."""
    from tasks.demo.build import build_demo_sites

    stores = build_demo_sites(
        out,
        n_sites=sites,
        scans_per_site=scans_per_site,
        n_slices=slices,
        seed=seed,
        size=size,
        preview=preview,
        keep_counts=counts,
    )
    for store in stores:
        console.print(f"wrote {store}")
    if preview:
        console.print(f"preview: {out / 'preview.png'}")


@app.command()
@friendly_errors
def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for the demo's scanner files and stores.")] = Path(
        "demo-output"
    ),
    sites: Annotated[int, typer.Option("--sites", min=1, max=8, help="Number of sites.")] = 3,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
) -> None:
    """The main job on the embedded default: demo sites end to end (denoise → reconstruct → surrogates →
    federated round) with a report."""
    from flows.demo import run_demo

    report = run_demo(out, n_sites=sites, seed=seed, console=console)
    if report.failed:
        raise fail(f"{len(report.failed)} scans failed; see {report.report_path or 'the flow logs'}", 1)
    console.print(f"demo complete: {len(report.scans)} scans of {sites} sites under {out}")


@app.command("run")
@friendly_errors
def run_pipeline(
    data_root: Annotated[str, typer.Argument(help="Folder or fsspec URL holding one <site>.zarr store per site.")],
    config: Annotated[
        Path | None,
        typer.Option("--config", help="Pipeline config file (format: configs/pipeline.yaml); default: built-in."),
    ] = None,
    site: Annotated[list[str] | None, typer.Option("--site", help="Only this site (repeatable).")] = None,
    federated: Annotated[
        bool, typer.Option("--federated/--no-federated", help="Run a federated round after the scans.")
    ] = True,
    report: Annotated[bool, typer.Option("--report/--no-report", help="Write report.html beside the stores.")] = True,
) -> None:
    """Run the nightly chain once, here: every pending stage of every scan (the registry's stages that apply to
    each scan's data kind), then a federated round. Embedded Prefect unless PREFECT_API_URL is set; a Dask
    LocalCluster unless FEDSCAN_DASK__ADDRESS is set."""
    if config is not None:
        PipelineConfig.from_yaml(config)  # a bad file is refused here, before Prefect or Dask start
    from flows.pipeline import NightlyRequest, PipelineFailedError, PipelineReport, nightly

    request = NightlyRequest(
        data_root=data_root,
        sites=tuple(site) if site else None,
        config_path=str(config) if config is not None else None,
        federated=federated,
        report=report,
    )
    failure: PipelineFailedError | None = None
    try:
        result: PipelineReport | None = nightly(request)
    except PipelineFailedError as exc:
        failure, result = exc, exc.report
    for outcome in result.scans if result is not None else ():
        states = ", ".join(f"{name} {state.value}" for name, state in outcome.stages.items())
        console.print(f"{outcome.scan}: {'ok' if outcome.ok else 'FAILED'} ({states})", highlight=False)
    if failure is not None:
        where = result.report_path if result is not None and result.report_path else "the flow logs"
        raise fail(f"{failure}; see {where}", 1)
    assert result is not None
    if not result.scans:
        console.print(f"nothing to do under {data_root}: every scan's stages are done with this config")
    else:
        console.print(f"{len(result.scans)} scans done under {data_root}")


@app.command("notify-failures")
@friendly_errors
def notify_failures(
    url: Annotated[
        str, typer.Argument(help="Webhook that gets a JSON POST {subject, text} per failed or crashed fedscan run.")
    ],
) -> None:
    """Notify a webhook whenever a fedscan flow run ends Failed or Crashed (on the server at PREFECT_API_URL)."""
    from prefect.settings import get_current_settings

    from flows.automations import NOTICE_NAME, install_failure_notice

    if not get_current_settings().api.url:
        raise fail("PREFECT_API_URL is not set: the automation would go to a throw-away server")
    automation_id = install_failure_notice(url)
    console.print(f"automation '{NOTICE_NAME}' ({automation_id}) notifies the webhook")


@app.command()
@friendly_errors
def watch(
    folder: Annotated[
        Path,
        typer.Argument(
            help="Folder to watch: <folder>/<site>/<scan> (or <folder>/<scan> with --site); a scan is a file "
            f"or a folder with fedscan.yaml. {describe_readers()}."
        ),
    ],
    site: Annotated[str | None, typer.Option("--site", help="All scans belong to this site.")] = None,
    settle_seconds: Annotated[float, typer.Option(help="A scan must be unchanged this long, seconds.")] = 2.0,
    interval_seconds: Annotated[float, typer.Option(help="Polling interval, seconds.")] = 1.0,
    max_seconds: Annotated[float | None, typer.Option(help="Stop after this long (default: run until Ctrl-C).")] = None,
) -> None:
    """Emit a `fedscan.scan.arrived` Prefect event for each complete scan that lands in FOLDER."""
    import logging

    from tasks.watch import EVENT_NAME, ScanArrival, ScanWatcher, emit_prefect_event

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    def announce(arrival: ScanArrival) -> None:
        emit_prefect_event(arrival)
        console.print(f"{EVENT_NAME}: site {arrival.site_id} {arrival.path}", highlight=False)

    watcher = ScanWatcher(folder, site_id=site, settle_seconds=settle_seconds, emit=announce)
    console.print(f"watching {folder} (Ctrl-C to stop)")
    try:
        watcher.run(interval_seconds=interval_seconds, max_seconds=max_seconds)
    except KeyboardInterrupt:
        console.print("stopped")


def run() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
