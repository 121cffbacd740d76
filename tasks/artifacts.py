"""What the operator sees in the Prefect UI: metric tables and small before/after images per stage.

Images are PNGs embedded in markdown artifacts as data URIs (the UI needs no image server). Which images may be
embedded is decided by the site's privacy policy (``tasks.previews.publishable``, docs/privacy.md): surrogates
always, plaintext reconstructions only with ``FEDSCAN_PRIVACY__SHARE_IMAGES=true``.
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw

from schemas.refs import StageReport


def in_prefect_run() -> bool:
    """True inside a Prefect flow or task run. Outside one (``task.fn()``, scripts, the benchmark's peer) an
    artifact has no run to attach to, and Prefect would create it anyway (deprecated) through whatever API it
    finds, starting a temporary server when none is configured: callers skip artifacts then."""
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", "-".join(parts).lower())).strip("-")[:120]


def to_uint8(image: npt.NDArray[np.floating], *, window: tuple[float, float] | None = None) -> npt.NDArray[np.uint8]:
    """Map an image to 0..255 with a window (default: 1st..99th percentile)."""
    img = np.asarray(image, dtype=np.float32)
    finite = img[np.isfinite(img)]
    if window is None:
        lo, hi = (float(np.percentile(finite, 1)), float(np.percentile(finite, 99))) if finite.size else (0.0, 1.0)
    else:
        lo, hi = window
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return np.clip((np.nan_to_num(img, nan=lo) - lo) * scale, 0, 255).astype(np.uint8)


def montage_png(
    panels: Sequence[tuple[str, npt.NDArray[np.floating]]],
    *,
    tile: int = 256,
    window: tuple[float, float] | None = None,
) -> bytes:
    """Side-by-side labelled panels (same window for all, so they compare) as PNG bytes."""
    if window is None:
        allpix = np.concatenate([np.asarray(p, np.float32).ravel() for _, p in panels])
        allpix = allpix[np.isfinite(allpix)]
        window = (float(np.percentile(allpix, 1)), float(np.percentile(allpix, 99))) if allpix.size else (0.0, 1.0)
    canvas = Image.new("L", (tile * len(panels), tile + 18), color=0)
    draw = ImageDraw.Draw(canvas)
    for i, (label, img) in enumerate(panels):
        tile_img = Image.fromarray(to_uint8(img, window=window)).resize((tile, tile), Image.Resampling.BILINEAR)
        canvas.paste(tile_img, (i * tile, 18))
        draw.text((i * tile + 4, 3), label, fill=255)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def png_markdown(title: str, png: bytes, caption: str = "") -> str:
    data = base64.b64encode(png).decode()
    return f"### {title}\n\n![{title}](data:image/png;base64,{data})\n\n{caption}\n"


def metrics_table(reports: Sequence[StageReport]) -> list[dict[str, object]]:
    """One row per (scan, stage) for a Prefect table artifact."""
    rows = []
    for r in reports:
        row: dict[str, object] = {
            "site": r.scan.site_id,
            "scan": r.scan.scan_id,
            "stage": r.stage,
            "skipped": r.skipped,
            "seconds": round(r.seconds, 3),
            "chunks_written": r.chunks_written,
            "chunks_resumed": r.chunks_resumed,
        }
        row.update({k: _fmt(v) for k, v in r.metrics.items()})
        rows.append(row)
    return rows


def stage_card(report: StageReport, image: str | None = None) -> str:
    """One stage of one scan as one markdown artifact: its metrics as a two-column table, then its image.

    One artifact per stage rather than a table and an image: each artifact is an API call and a database row
    on the Prefect server, which shares the machine with the stage work (``benchmarks/pipeline.py``).
    """
    rows = metrics_table([report])[0]
    lines = [f"### {report.stage} · {report.scan.site_id}/{report.scan.scan_id}", "", "| metric | value |", "|---|---|"]
    for key, value in rows.items():
        if key in ("site", "scan", "stage"):
            continue
        text = str(value).replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {key} | {text} |")
    card = "\n".join(lines) + "\n"
    if image:
        card += "\n" + image.replace("### ", "#### ", 1)
    return card


def _fmt(value: object) -> object:
    if isinstance(value, float):
        return float(f"{value:.4g}")
    return value
