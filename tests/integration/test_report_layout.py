"""The run report in a real headless Chromium: a wide table scrolls inside its box, the page does not widen."""

from __future__ import annotations

import pytest

from tasks.report import line_plot_svg, render_report
from tests.integration.browser import chromium, chromium_path, evaluate_when_ready

_LAYOUT = """(() => {
  const wrap = document.querySelector('.table-wrap');
  const table = wrap && wrap.querySelector('table');
  if (!table || !document.querySelector('svg circle')) return null;
  return {page: document.documentElement.scrollWidth, window: window.innerWidth,
          table: table.scrollWidth, box: wrap.clientWidth,
          summaryTop: document.getElementById('summary').getBoundingClientRect().top,
          h1Top: document.querySelector('h1').getBoundingClientRect().top};
})()"""


@pytest.mark.slow
def test_a_wide_table_scrolls_inside_its_box_and_the_summary_comes_first(tmp_path):
    if chromium_path() is None:
        pytest.skip("no chromium (scripts/_system_deps.sh installs it)")
    rows = [{f"metric {k}": 123456.789 * k for k in range(40)} | {"error": "x" * 400} for _ in range(3)]
    plot = line_plot_svg({"auc": [(1, 0.5), (2, 0.6)]}, title="AUC", x_label="round", y_label="AUC")
    page = tmp_path / "report.html"
    page.write_text(render_report(title="r", summary="1 scans processed", sections=[("Wide", rows)], plots=[plot]))
    with chromium() as port:
        got = evaluate_when_ready(port, page.as_uri(), _LAYOUT, timeout=60)
    assert got is not None
    assert got["table"] > got["box"]  # the table is wider than its box: the box scrolls ...
    assert got["page"] <= got["window"]  # ... and the page itself does not widen
    assert got["summaryTop"] < got["h1Top"]  # the summary line is the first thing on the page
