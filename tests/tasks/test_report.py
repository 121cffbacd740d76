"""The run report's HTML: summary first, tables that scroll inside their box, an SVG plot, the chance note."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from tasks.pipeline_support import KnownFailure, report_summary
from tasks.report import chance_note, html_table, line_plot_svg, render_report


class _Outcome:
    def __init__(self, scan: str, ok: bool) -> None:
        self.scan, self.ok = scan, ok


@pytest.mark.parametrize(
    ("auc", "ci95", "at_chance"),
    [
        (0.52, None, True),  # demo-sized run, no interval: below 0.6
        (0.59, None, True),
        (0.61, None, False),
        (0.93, None, False),
        (0.70, (0.45, 0.90), True),  # the interval holds 0.5
        (0.55, (0.51, 0.60), False),  # the interval excludes 0.5
        (None, None, False),
        (float("nan"), None, False),
    ],
)
def test_chance_note_appears_only_when_the_numbers_say_so(auc, ci95, at_chance):
    note = chance_note(auc, ci95)
    assert (note is not None) is at_chance
    if at_chance:
        assert "chance level" in note and f"{auc:.2f}" in note and "demo data" in note


def test_report_summary_counts_match_the_outcomes():
    outcomes = [_Outcome("A/1", True), _Outcome("A/2", True), _Outcome("B/1", False)]
    known = [KnownFailure(scan="B/2", stage="denoise", since="2026-12-01T02:00:00+00:00")]
    fed = {"status": "finished:completed", "rounds": [{"round": 1, "eval_auc": 0.4}, {"round": 2, "eval_auc": 0.55}]}
    line = report_summary(outcomes, fed, known_failures=known, up_to_date=4)
    assert line.startswith("2 scans processed, 5 skipped (4 up to date, 1 known failures), 1 failed;")
    assert line.endswith("federated: finished:completed, 2 rounds, final AUC 0.55")
    assert report_summary([], None).endswith("federated: not run")
    assert "federated: failed (RuntimeError: boom)" in report_summary(
        [], {"status": "failed", "error": "RuntimeError: boom"}
    )


def test_render_report_puts_the_summary_first_and_tables_in_a_scrolling_box():
    wide = [{f"column {k}": "x" * 200 for k in range(30)}]
    svg = line_plot_svg(
        {"auc": [(1, 0.4), (2, 0.5)]}, title="t", x_label="round", y_label="AUC", reference=(0.5, "chance")
    )
    text = render_report(
        title="r", summary="3 scans processed", sections=[("Wide", wide)], plots=[svg], warnings=["at chance"]
    )
    body = text.split("<body>", 1)[1]
    assert body.lstrip().startswith("<p class='summary' id='summary'>3 scans processed</p>")
    assert ".table-wrap { max-width: 100%; overflow-x: auto;" in text and "overflow-wrap: anywhere" in text
    assert html_table(wide).startswith("<div class='table-wrap'><table>")
    assert "<p class='note'>at chance</p>" in text and "<svg" in text


def test_line_plot_is_valid_svg_with_one_point_per_round_and_the_chance_line():
    svg = line_plot_svg(
        {"auc": [(1, 0.2), (2, 0.6), (3, 0.9)]},
        title="AUC <over> rounds",
        x_label="round",
        y_label="AUC",
        y_range=(0.0, 1.0),
        reference=(0.5, "chance"),
    )
    root = ET.fromstring(svg)  # well-formed (titles are escaped)
    ns = "{http://www.w3.org/2000/svg}"
    circles = root.findall(f"{ns}circle")
    assert len(circles) == 3
    ys = [float(c.get("cy")) for c in circles]
    assert ys[0] > ys[1] > ys[2]  # higher AUC is drawn higher (SVG y grows downwards)
    dashed = [ln for ln in root.findall(f"{ns}line") if ln.get("stroke-dasharray")]
    assert len(dashed) == 1 and ys[0] > float(dashed[0].get("y1")) > ys[1]  # 0.5 lies between 0.2 and 0.6
    with pytest.raises(ValueError, match="no finite points"):
        line_plot_svg({"auc": [(1, float("nan"))]}, title="empty", x_label="x", y_label="y")
