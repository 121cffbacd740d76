"""The site boundary (docs/privacy.md): what a whole run sends to the Prefect API carries no plaintext image and no
value of a scan's identifying input.

A real run — ``process-scan`` ingesting a scanner file whose name identifies a patient, then ``nightly`` over it
and a demo site with a truth phantom, run report on — against the session's Prefect API. Then every artifact,
log record (the API's and every Python logging record of the process) and event of those runs is read back; every
PNG embedded in them is decoded, cut into its panels and correlated with every plaintext slice of every scan
(stored volume, FBP of the raw projections, truth). With ``FEDSCAN_PRIVACY__SHARE_IMAGES=true`` the same walk
finds the plaintext panels: the detector works.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import re
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from uuid import UUID

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from tasks.storage import SiteStore, find_site_stores

#: The scanner file's name: what an archive export typically looks like.
IDENTIFYING_STEM = "DOE_JANE_19700101_MRN123456"
#: The parts of it that identify on their own.
IDENTIFYING_TOKENS = (IDENTIFYING_STEM, "DOE_JANE", "DOE^JANE", "19700101", "MRN123456")
#: A panel whose detail correlates this much with a plaintext slice's shows that slice.
CORRELATION_LIMIT = 0.5
#: The blur subtracted to leave an image's detail, pixels of the slice's grid.
DETAIL_SIGMA_PX = 1.0

_PNG = re.compile(r"data:image/png;base64,([A-Za-z0-9+/=]+)")
_LABEL_BAR_PX = 18  # tasks.artifacts.montage_png: labels above the tiles


# ------------------------------------------------------------------------------------------------
# The detector
# ------------------------------------------------------------------------------------------------
def embedded_pngs(text: str) -> list[bytes]:
    return [base64.b64decode(m) for m in _PNG.findall(text)]


def panels(png: bytes) -> list[npt.NDArray[np.float32]]:
    """A montage's tiles (square tiles under an 18-pixel label bar), or the whole image when it is not one."""
    img = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float32)
    tile = img.shape[0] - _LABEL_BAR_PX
    if tile > 0 and img.shape[1] % tile == 0:
        return [img[_LABEL_BAR_PX:, i * tile : (i + 1) * tile] for i in range(img.shape[1] // tile)]
    return [img]


def _resized(image: npt.NDArray[np.float32], shape: tuple[int, ...]) -> npt.NDArray[np.float32]:
    pil = Image.fromarray(np.asarray(image, dtype=np.float32), mode="F")
    return np.asarray(pil.resize((shape[1], shape[0]), Image.Resampling.BILINEAR), dtype=np.float32)


def _r(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return 0.0 if den == 0 else float((a * b).sum() / den)


def _detail(image: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    from scipy.ndimage import gaussian_filter

    return image - gaussian_filter(image, DETAIL_SIGMA_PX)


def correlation(panel: npt.NDArray[np.float32], plaintext: npt.NDArray[np.float32]) -> float:
    """|r| between the detail of a displayed panel, resized to the slice's grid, and the detail of a plaintext
    slice taken as is or under a display window (soft-tissue HU, 1st-99th percentile): the largest of the three.

    Detail (the image minus its Gaussian blur, :data:`DETAIL_SIGMA_PX`), not raw intensity: any two CT slices
    share a body outline in air, so raw intensities of different demo patients correlate 0.6-0.97, and a
    surrogate (its phase from a public host CT) 0.8 with the private slice and as much with other patients'.
    """
    ref = np.nan_to_num(np.asarray(plaintext, dtype=np.float32))
    shown = _detail(_resized(panel, ref.shape))
    lo, hi = np.percentile(ref, [1, 99])
    return max(abs(_r(shown, _detail(view))) for view in (ref, np.clip(ref, -200.0, 300.0), np.clip(ref, lo, hi)))


def identity_hits(text: str) -> list[str]:
    """The identifying tokens in ``text`` (embedded images removed: their base64 is not text)."""
    plain = _PNG.sub("data:image/png;base64,…", text).lower()
    return [token for token in IDENTIFYING_TOKENS if token.lower() in plain]


def plaintext_slices(
    data_root: Path, extra: Iterable[tuple[str, npt.NDArray[np.float32]]] = ()
) -> Iterator[tuple[str, npt.NDArray[np.float32]]]:
    """Every plaintext slice of every scan under ``data_root``: stored volume, truth, and the FBP of each raw
    projection row (computed here, independently of what the pipeline stored)."""
    from tasks.reconstruct.kernels import fbp

    yield from extra
    for path in find_site_stores(data_root):
        for scan in SiteStore.open(path, mode="r").scans():
            names = scan.array_names()
            for name in ("volume", "volume_truth"):
                if name in names:
                    for k, img in enumerate(np.asarray(scan.array(name)[...], dtype=np.float32)):
                        yield f"{scan.scan_id}/{name}[{k}]", img
            geometry = scan.manifest.geometry
            if geometry is not None and "projections" in names:
                raw = np.asarray(scan.array("projections")[...], dtype=np.float32).transpose(1, 0, 2)
                for k, img in enumerate(np.asarray(fbp(raw, geometry, filter_name="hann"), dtype=np.float32)):
                    yield f"{scan.scan_id}/raw-fbp[{k}]", img


def image_findings(where: str, text: str, references: list[tuple[str, npt.NDArray[np.float32]]]) -> list[str]:
    found = []
    for n, png in enumerate(embedded_pngs(text)):
        for i, panel in enumerate(panels(png)):
            for name, ref in references:
                r = correlation(panel, ref)
                if r > CORRELATION_LIMIT:
                    found.append(f"{where}: image {n} panel {i} shows {name} (|r| = {r:.2f})")
    return found


# ------------------------------------------------------------------------------------------------
# The detector on known inputs (fast)
# ------------------------------------------------------------------------------------------------
def test_the_detector_finds_a_plaintext_panel_and_passes_noise(rng):
    from tasks.artifacts import montage_png, png_markdown

    phantom = _disc_phantom(32)
    noise = rng.normal(size=(32, 32)).astype(np.float32)
    # shown in HU under the soft-tissue window, upscaled to a 256-pixel tile beside a noise panel
    shown = png_markdown("x", montage_png([("noise", noise), ("slice", phantom * 1000.0 - 900.0)], window=(-200, 300)))
    findings = image_findings("card", shown, [("phantom", phantom)])
    assert len(findings) == 1 and findings[0].startswith("card: image 0 panel 1 shows phantom"), findings
    other = png_markdown("y", montage_png([("noise", rng.normal(size=(32, 32)).astype(np.float32))]))
    assert image_findings("card", other, [("phantom", phantom)]) == []
    text = f"scan ct-0001 from {IDENTIFYING_STEM}.npy " + shown
    assert identity_hits(text) == [IDENTIFYING_STEM, "DOE_JANE", "19700101", "MRN123456"]
    assert identity_hits(shown) == []  # base64 is not searched


def _disc_phantom(n: int) -> npt.NDArray[np.float32]:
    y, x = np.mgrid[:n, :n] - (n - 1) / 2
    img = (x**2 + y**2 < (0.4 * n) ** 2).astype(np.float32)
    img += 0.5 * ((x - 4) ** 2 + (y + 3) ** 2 < (0.12 * n) ** 2)
    return img


# ------------------------------------------------------------------------------------------------
# A whole run
# ------------------------------------------------------------------------------------------------
def _scanner_file(folder: Path) -> tuple[Path, npt.NDArray[np.float32]]:
    """A counts file named like an archive export (its sidecar names the scan ``ct-0001``); returns its path and
    the phantom it was projected from."""
    from schemas.geometry import Geometry, ReconGrid
    from tasks.phantoms import parallel_line_integrals, render, shepp_logan
    from tasks.scanner_output import ScannerFormat, write_scanner_output

    cols, rows, views = 48, 3, 180
    geometry = Geometry(
        beam="parallel",
        n_views=views,
        n_detector_cols=cols,
        n_detector_rows=rows,
        detector_pitch_mm=1.0,
        grid=ReconGrid(nx_pixels=cols, ny_pixels=cols, pixel_size_mm=1.0),
    )
    ellipses = shepp_logan(0.45 * cols)
    clean = parallel_line_integrals(ellipses, geometry).astype(np.float32)
    p = np.repeat(clean[:, None, :], rows, axis=1)
    counts = np.random.default_rng(7).poisson(2e4 * np.exp(-p)).astype(np.float32)
    src = write_scanner_output(
        folder,
        scan_id="ct-0001",
        geometry=geometry,
        line_integrals=p,
        counts=counts,
        i0_photons=2e4,
        water_attenuation_per_mm=0.0192,
        fmt=ScannerFormat.NPY_COUNTS,
    )
    named = src.with_name(f"{IDENTIFYING_STEM}.npy")
    src.rename(named)
    src.with_name(src.name + ".yaml").rename(named.with_name(named.name + ".yaml"))
    return named, np.asarray(render(ellipses, geometry.grid), dtype=np.float32)


def _promote_model(data_root: Path) -> str:
    """Register and promote an (untrained) classifier for the demo site's slice size; returns that site's id."""
    from schemas.demo import DemoSize, default_sites
    from schemas.registry import ModelCard, PrivacyCard
    from tasks.federated.model import build_model, get_arrays, shared_keys
    from tasks.registry import ModelRegistry, weights_sha256

    profile = default_sites(1)[0]
    grid = profile.grid(DemoSize.TINY)
    model = build_model("classify", base_channels=4, seed=0)
    arrays = get_arrays(model, shared_keys(model, fedbn=False, local_statistics=False))
    card = ModelCard(
        sha256=weights_sha256(arrays),
        task="classify",
        input_size=(grid.ny_pixels, grid.nx_pixels),
        architecture="LesionClassifier",
        base_channels=4,
        fedbn=False,
        local_bn_statistics=False,
        sites=(),
        rounds=0,
        strategy="fedavg",
        privacy=PrivacyCard(secagg=False, dp_mode="off"),
        metric_value=0.5,
        code_version="test",
        created_at=datetime.now(UTC),
    )
    registry = ModelRegistry.for_data_root(str(data_root))
    registry.promote(registry.register(card, arrays).version)
    return profile.site_id


class _Records(logging.Handler):
    """Every Python logging record of the process, formatted as its handlers would."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name}: {record.getMessage()}")


async def _api_view(flow_run_ids: list[UUID], since: datetime) -> dict[str, list[str]]:
    """Everything the Prefect API holds about these flow runs, as text: artifacts, logs, events, run names."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
        TaskRunFilter,
        TaskRunFilterFlowRunId,
    )
    from prefect.events.filters import EventFilter, EventOccurredFilter

    async with get_client() as client:
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=flow_run_ids))
        )
        logs = []
        while True:
            page = await client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=flow_run_ids)), limit=200, offset=len(logs)
            )
            logs += page
            if len(page) < 200:
                break
        events = []
        page_ = await client.read_events(
            filter=EventFilter(occurred=EventOccurredFilter(since=since, until=datetime.now(UTC))), limit=50
        )
        events += page_.events
        while page_.next_page:
            page_ = await client.read_events_page(page_.next_page)
            events += page_.events
        flow_runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=flow_run_ids)))
        task_runs = await client.read_task_runs(
            task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=flow_run_ids))
        )
    return {
        "artifact": [f"{a.key} | {a.type} | {a.description} | {a.data}" for a in artifacts],
        "log": [f"{log.name}: {log.message}" for log in logs],
        "event": [e.model_dump_json() for e in events],
        "run name": [r.name for r in flow_runs] + [t.name for t in task_runs],
    }


def _settled_api_view(flow_run_ids: list[UUID], since: datetime) -> dict[str, list[str]]:
    """The API's view once the background senders have delivered: logs flushed, events persisted (the server
    writes events in batches; read until two reads a few seconds apart agree)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all()
    EventsWorker.drain_all()
    view = asyncio.run(_api_view(flow_run_ids, since))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(3)
        again = asyncio.run(_api_view(flow_run_ids, since))
        if {k: len(v) for k, v in again.items()} == {k: len(v) for k, v in view.items()}:
            return again
        view = again
    return view


@pytest.fixture
def share_images_setting(request, monkeypatch):
    from schemas.settings import get_settings

    monkeypatch.setenv("FEDSCAN_PRIVACY__SHARE_IMAGES", "true" if request.param else "false")
    monkeypatch.setenv("FEDSCAN_DEVICE", "cpu")
    get_settings.cache_clear()
    yield request.param
    get_settings.cache_clear()


@pytest.mark.slow
@pytest.mark.parametrize("share_images_setting", [False, True], indirect=True, ids=["default", "share-images"])
def test_a_whole_run_sends_no_plaintext_image_and_no_identity(tmp_path, prefect_harness, share_images_setting):
    from flows.pipeline import NightlyRequest, ProcessScanRequest, nightly, process_scan
    from schemas.diagnose import DiagnoseConfig
    from schemas.pipeline import PipelineConfig
    from tasks.demo.build import build_demo_sites

    data_root = tmp_path / "data"
    build_demo_sites(data_root, n_sites=1, scans_per_site=1, n_slices=3, seed=0, size="tiny")  # has a truth
    source, phantom = _scanner_file(tmp_path / "incoming")
    records = _Records()
    watched = [logging.getLogger(), logging.getLogger("prefect"), logging.getLogger("fedscan")]
    for logger in watched:
        logger.addHandler(records)
    since = datetime.now(UTC)
    try:
        first = process_scan(
            ProcessScanRequest(source=source, site_id="S", data_root=str(data_root)), return_state=True
        )
        # a promoted model for the demo site's slices: its diagnose stage runs and publishes flagged slices
        demo_site = _promote_model(data_root)
        diagnose_all = PipelineConfig(diagnose=DiagnoseConfig(threshold=0.001))  # every slice flagged
        second = nightly(
            NightlyRequest(
                data_root=str(data_root), sites=(demo_site,), config=diagnose_all, federated=False, report=True
            ),
            return_state=True,
        )
    finally:
        for logger in watched:
            logger.removeHandler(records)
    assert first.is_completed() and second.is_completed()
    report = second.result()
    # the scanner file was processed by process-scan: the nightly finds only the demo scan left to do
    assert [o.ok for o in report.scans] == [True]
    run_ids = [first.state_details.flow_run_id, second.state_details.flow_run_id]
    view = _settled_api_view(run_ids, since)
    view["python log record"] = records.lines
    assert view["artifact"] and view["log"] and view["event"]
    assert any("fedscan-run-report" in a for a in view["artifact"])  # the shared run summary is walked too
    assert report.scans[0].stages["diagnose"] == "done"
    flagged = [a for a in view["artifact"] if "slices flagged" in a]  # the diagnose card: surrogates and scores
    assert flagged and all(embedded_pngs(a) for a in flagged)

    references = list(plaintext_slices(data_root, [("ct-0001/phantom", phantom)]))
    assert {name.split("/")[1].split("[")[0] for name, _ in references} >= {"volume", "volume_truth", "raw-fbp"}
    leaks, names = [], []
    for kind, texts in view.items():
        for n, text in enumerate(texts):
            leaks += image_findings(f"{kind} {n}", text, references)
            names += [f"{kind} {n}: {hit}" for hit in identity_hits(text)]
    assert names == [], names  # never, whatever the image policy

    # the site-only report keeps the plaintext slices either way (it is where the operator sees them)
    html = Path(report.report_path).read_text()
    assert image_findings("report.html", html, references)
    assert "Site-only" in html

    if not share_images_setting:
        assert leaks == [], leaks
        # the surrogates did leave, so the walk saw images: it is not vacuous
        assert sum(len(embedded_pngs(t)) for t in view["artifact"]) >= 2
    else:  # the explicit opt-in: the reconstruct cards and the run summary carry plaintext panels
        assert any(leak.startswith("artifact") for leak in leaks), view["artifact"]
        shown = {leak.split(" shows ")[1].split("[")[0] for leak in leaks}
        assert {"ct-0001/raw-fbp", "ct-0001/volume"} <= shown, shown
    json.dumps(leaks)  # findings are plain strings: readable in the failure message


def test_the_arrival_event_names_the_incoming_file(tmp_path, monkeypatch):
    """docs/privacy.md classes ``fedscan.scan.arrived`` as site-only: its payload carries the path the deployment it
    triggers needs; its resource id and name are a digest of that path."""
    import prefect.events

    from tasks.watch import EVENT_NAME, ScanArrival, emit_prefect_event

    sent: list[dict[str, object]] = []
    monkeypatch.setattr(prefect.events, "emit_event", lambda **kwargs: sent.append(kwargs))
    emit_prefect_event(ScanArrival(site_id="S", path=tmp_path / f"{IDENTIFYING_STEM}.npy", signature="1:2:3"))
    (event,) = sent
    assert event["event"] == EVENT_NAME
    assert identity_hits(json.dumps(event["payload"]))  # the path: what the deployment it triggers needs
    assert identity_hits(json.dumps(event["resource"])) == []  # the resource id is a digest of the path
