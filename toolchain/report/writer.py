"""Writing a run's reports, and marking a previous report stale before a new run starts.

A run directory's report.json is a verdict only for the run that wrote it. So a run marks
the old one stale (``status: stale``, ``passed: false``) and removes the old report.md and
report.html before its first stage, and writes report.json *last*, after the plots,
report.md and report.html: a run that crashes at any point leaves a report that
``robustprune gate`` refuses.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from toolchain.report.schema import STALE, Report
from toolchain.rundir import RunLayout, atomic_path, write_json

log = logging.getLogger(__name__)


def mark_stale(root: Path) -> None:
    """Before a run starts in ``root``: the previous report is no verdict for this run.

    report.json keeps its numbers for reference with ``status: stale`` and ``passed: false``
    (an unreadable one is removed); report.md and report.html are removed.
    """
    layout = RunLayout(root)
    layout.report_md.unlink(missing_ok=True)
    layout.report_html.unlink(missing_ok=True)
    path = layout.report_json
    if not path.is_file():
        return
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        data = None
    if not isinstance(data, dict):
        path.unlink()
        return
    data.update(status=STALE, passed=False)
    write_json(path, data)
    log.info("previous report in %s marked stale until this run completes", root)


def write_report(root: Path, report: Report) -> None:
    """Write the plots, report.md, report.html and finally report.json into ``root``.

    A plot that fails to draw is logged and left out (the verdict does not depend on it).
    """
    from toolchain.report.html import render_html
    from toolchain.report.markdown import render_markdown
    from toolchain.report.plots import write_plots

    layout = RunLayout(root)
    try:
        plots = write_plots(report, layout.plots)
    except Exception as exc:  # matplotlib trouble must never lose the report itself
        log.warning("plots not written: %s", exc)
        plots = []
    with atomic_path(layout.report_md) as tmp:
        tmp.write_text(render_markdown(report, [p.relative_to(layout.root) for p in plots]))
    with atomic_path(layout.report_html) as tmp:
        tmp.write_text(render_html(report, plots))
    write_json(layout.report_json, report.to_json())
