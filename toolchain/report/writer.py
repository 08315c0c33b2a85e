"""Writing a run's reports, and marking a previous report stale before a new run starts.

A run directory's report.json is a verdict only for the run that wrote it. So a run marks
the old one stale (``status: stale``, ``passed: false``) and removes the old report.md and
report.html before anything else (before its recipe is even read when ``--out`` is given,
so a recipe refused as bad input leaves no old verdict behind), and writes report.json *last*,
after the plots, report.md and report.html: a run that crashes at any point leaves a report
that ``robustprune gate`` refuses.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from toolchain.report.schema import STALE, Report
from toolchain.rundir import RunLayout, atomic_path, write_json
from toolchain.runlock import in_use

log = logging.getLogger(__name__)


def mark_stale(root: Path) -> None:
    """Before a run (or ``validate``) starts in ``root``: no report it may replace is a verdict
    for it any more.

    That is ``root``'s report.json and those ``validate`` wrote beside the run's files
    (``<stage>/validate-<file>/report.json``: a re-run rebuilds those files). Each keeps its
    numbers for reference with ``status: stale`` and ``passed: false`` (an unreadable one is
    removed); the report.md and report.html beside it are removed. A folder that robustprune
    did not create (no run marker) is left alone.
    """
    layout = RunLayout(root)
    if not layout.is_run_directory():
        return
    _mark_one(layout)
    for nested in sorted(layout.root.glob("*/validate-*/report.json")):
        _mark_one(RunLayout(nested.parent))


def mark_stale_before_start(root: Path) -> None:
    """:func:`mark_stale`, first thing, before the lock is taken or the input checked; a folder
    a live run holds is left alone (that run marked it when it started, and this one will be
    refused)."""
    if not in_use(root):
        mark_stale(root)


def _mark_one(layout: RunLayout) -> None:
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
    if data.get("status") == STALE and data.get("passed") is False:
        return
    data.update(status=STALE, passed=False)
    write_json(path, data)
    log.info("previous report in %s marked stale until this run completes", layout.root)


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
