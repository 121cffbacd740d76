"""The run report: one self-contained HTML file (summary line, tables, an inline SVG plot, embedded PNGs).

No Prefect and no store here: :mod:`tasks.pipeline_support` gathers the rows and decides where the file goes.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

__all__ = ["chance_note", "html_table", "line_plot_svg", "render_report"]

# Tables sit in a scrolling box and long cells wrap, so no table widens the page (a 2400 px table of
# per-stage metrics used to push the whole report sideways).
_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 100%; }
.summary { font-size: 1.15em; font-weight: 600; padding: 0.6em 0.8em; background: #f4f7fb;
  border-left: 4px solid #3b6ea5; }
.summary.bad { background: #fdf0f2; border-left-color: #b00020; }
.note { padding: 0.5em 0.8em; background: #fff8e1; border-left: 4px solid #e0a800; }
.table-wrap { max-width: 100%; overflow-x: auto; margin: 0.5em 0 1.5em; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; vertical-align: top; }
td { max-width: 32em; overflow-wrap: anywhere; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
.failed { color: #b00020; font-weight: 600; } img, svg { max-width: 100%; height: auto; }
img { border: 1px solid #ddd; }
"""

#: Below this AUC a demo-sized federated run cannot be told from guessing (the demo has no interval to show).
CHANCE_AUC = 0.6


def html_table(rows: Sequence[Mapping[str, object]]) -> str:
    """Rows (dicts; columns in order of first appearance) as an HTML table inside a scrolling box."""
    if not rows:
        return "<p><em>none</em></p>"
    cols: list[str] = []
    for row in rows:
        cols += [c for c in row if c not in cols]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(row.get(c, '')))}</td>" for c in cols) + "</tr>" for row in rows
    )
    return f"<div class='table-wrap'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def chance_note(auc: float | None, ci95: tuple[float, float] | None = None) -> str | None:
    """A plain sentence when a federated AUC is at chance level (its 95 % interval holds 0.5, or, with no
    interval, it is below :data:`CHANCE_AUC`); None otherwise."""
    if auc is None or not math.isfinite(auc):
        return None
    if ci95 is not None:
        low, high = ci95
        if not low <= 0.5 <= high:
            return None
        why = f"its 95 % interval ({low:.2f}–{high:.2f}) includes 0.5"
    elif auc >= CHANCE_AUC:
        return None
    else:
        why = f"it is below {CHANCE_AUC}"
    return (
        f"The federated model's AUC ({auc:.2f}) is at chance level: {why}. On demo data this is expected: a few "
        "rounds on a handful of small simulated scans leave too few held-out lesion slices to tell the model from "
        "guessing. It says nothing about the method on real data."
    )


def line_plot_svg(
    series: Mapping[str, Sequence[tuple[float, float]]],
    *,
    title: str,
    x_label: str,
    y_label: str,
    y_range: tuple[float, float] | None = None,
    reference: tuple[float, str] | None = None,
    width: int = 560,
    height: int = 300,
) -> str:
    """A small self-contained SVG line plot (matplotlib is not a dependency): one polyline per series, points
    marked, axes with min/max ticks, and an optional dashed horizontal ``reference`` line (value, label)."""
    points = [p for pts in series.values() for p in pts if math.isfinite(p[0]) and math.isfinite(p[1])]
    if not points:
        raise ValueError(f"plot {title!r}: no finite points")
    left, right, top, bottom = 60, 20, 30, 45
    xs = [p[0] for p in points]
    ys = [p[1] for p in points] + ([reference[0]] if reference else [])
    x0, x1 = min(xs), max(xs)
    y0, y1 = y_range if y_range is not None else (min(ys), max(ys))
    x1 = x1 if x1 > x0 else x0 + 1
    y1 = y1 if y1 > y0 else y0 + 1

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def sy(y: float) -> float:
        return height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)

    esc = html.escape
    parts = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' viewBox='0 0 {width} {height}' "
        f"role='img' aria-label='{esc(title)}' font-family='sans-serif' font-size='11'>",
        f"<text x='{width / 2}' y='16' text-anchor='middle' font-size='13'>{esc(title)}</text>",
        f"<line x1='{left}' y1='{sy(y0)}' x2='{width - right}' y2='{sy(y0)}' stroke='#444'/>",
        f"<line x1='{left}' y1='{sy(y0)}' x2='{left}' y2='{top}' stroke='#444'/>",
        f"<text x='{(left + width - right) / 2}' y='{height - 8}' text-anchor='middle'>{esc(x_label)}</text>",
        f"<text x='14' y='{(top + height - bottom) / 2}' text-anchor='middle' "
        f"transform='rotate(-90 14 {(top + height - bottom) / 2})'>{esc(y_label)}</text>",
    ]
    for y in (y0, y1):
        parts.append(f"<text x='{left - 6}' y='{sy(y) + 4}' text-anchor='end'>{y:.3g}</text>")
    for x in sorted(set(xs)):
        parts.append(f"<text x='{sx(x)}' y='{sy(y0) + 16}' text-anchor='middle'>{x:g}</text>")
    if reference is not None:
        value, label = reference
        parts.append(
            f"<line x1='{left}' y1='{sy(value)}' x2='{width - right}' y2='{sy(value)}' stroke='#999' "
            f"stroke-dasharray='5,4'/><text x='{width - right}' y='{sy(value) - 4}' text-anchor='end' "
            f"fill='#777'>{esc(label)}</text>"
        )
    colours = ("#3b6ea5", "#c0504d", "#4f9a4f", "#8064a2")
    for k, (name, pts) in enumerate(series.items()):
        colour = colours[k % len(colours)]
        good = [(sx(x), sy(y)) for x, y in pts if math.isfinite(x) and math.isfinite(y)]
        if not good:
            continue
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in good)
        parts.append(f"<polyline points='{path}' fill='none' stroke='{colour}' stroke-width='2'/>")
        parts += [f"<circle cx='{x:.1f}' cy='{y:.1f}' r='3' fill='{colour}'/>" for x, y in good]
        parts.append(f"<text x='{left + 8}' y='{top + 14 * (k + 1)}' fill='{colour}'>{esc(name)}</text>")
    parts.append("</svg>")
    return "".join(parts)


def render_report(
    *,
    title: str,
    summary: str,
    summary_bad: bool = False,
    sections: Sequence[tuple[str, Sequence[Mapping[str, object]]]],
    plots: Sequence[str] = (),
    images: Sequence[tuple[str, bytes]] = (),
    failures: Sequence[Mapping[str, object]] = (),
    notes: Sequence[str] = (),
    warnings: Sequence[str] = (),
    details: Sequence[tuple[str, Sequence[Mapping[str, object]]]] = (),
    written_at: datetime | None = None,
) -> str:
    """The report's HTML: ``summary`` (one line) first, then ``warnings`` (highlighted notes), failures, tables
    (``sections``), plots (SVG strings), images (PNG bytes with captions) and the long tables (``details``);
    ``notes`` go under the title."""
    when = written_at or datetime.now(UTC)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<p class='summary{' bad' if summary_bad else ''}' id='summary'>{html.escape(summary)}</p>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>written {when:%Y-%m-%d %H:%M:%S} UTC</p>",
    ]
    parts += [f"<p>{html.escape(n)}</p>" for n in notes]
    parts += [f"<p class='note'>{html.escape(w)}</p>" for w in warnings]
    if failures:
        parts.append("<h2 class='failed'>Failed scans</h2>" + html_table(failures))
    for heading, rows in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>" + html_table(rows))
    if plots:
        parts.append("<h2>Plots</h2>")
        parts += [f"<figure>{svg}</figure>" for svg in plots]
    if images:
        parts.append("<h2>Images</h2>")
        for caption, png in images:
            data = base64.b64encode(png).decode()
            parts.append(
                f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
    for heading, rows in details:
        parts.append(f"<h2>{html.escape(heading)}</h2>" + html_table(rows))
    parts.append("</body></html>")
    return "\n".join(parts)
