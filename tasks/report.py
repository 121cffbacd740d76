"""The run report: one self-contained HTML file (tables + embedded PNGs) written next to the site stores."""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
.failed { color: #b00020; font-weight: 600; } img { max-width: 100%; border: 1px solid #ddd; }
"""


def html_table(rows: Sequence[Mapping[str, object]]) -> str:
    if not rows:
        return "<p><em>none</em></p>"
    cols: list[str] = []
    for row in rows:
        cols += [c for c in row if c not in cols]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(row.get(c, '')))}</td>" for c in cols) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_report(
    path: Path,
    *,
    title: str,
    sections: Sequence[tuple[str, Sequence[Mapping[str, object]]]],
    images: Sequence[tuple[str, bytes]] = (),
    failures: Sequence[Mapping[str, object]] = (),
    notes: Sequence[str] = (),
) -> Path:
    """Write the HTML report; returns its path."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>written {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC</p>",
    ]
    parts += [f"<p>{html.escape(n)}</p>" for n in notes]
    if failures:
        parts.append("<h2 class='failed'>Failed scans</h2>" + html_table(failures))
    for heading, rows in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>" + html_table(rows))
    if images:
        parts.append("<h2>Images</h2>")
        for caption, png in images:
            data = base64.b64encode(png).decode()
            parts.append(
                f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
    parts.append("</body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
