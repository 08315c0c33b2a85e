"""report.html: self-contained (no external reference), and every image loads in a real browser.

The browser test renders the tiny run's report.html in headless Chromium (Debian's
``chromium``; ``.ci/run`` installs it) with the network shut off, and reads back from the DOM
which images decoded (``naturalWidth`` > 0) and whether the summary table is there. It skips
with its reason where Chromium is absent.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from toolchain.report.schema import Report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    # No network: every host resolves nowhere, so an external reference could never load.
    "--host-resolver-rules=MAP * ~NOTFOUND",
]

# Written into a copy of the page (the report itself has no script): after load, record each
# image's decoded width on the body, where --dump-dom shows it.
_PROBE = """<script>
window.addEventListener("load", () => {
  const widths = Array.from(document.images).map((img) => img.complete ? img.naturalWidth : -1);
  document.body.setAttribute("data-image-widths", widths.join(","));
  document.body.setAttribute("data-summary-rows", String(document.querySelectorAll("#summary tr").length));
});
</script>"""

pytestmark = pytest.mark.e2e


class _Refs(HTMLParser):
    """Every URL-like attribute in a page."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href", "srcset", "data", "action", "poster") and value is not None:
                self.refs.append((tag, name, value))


def test_report_html_is_self_contained(tiny_run: tuple[Path, Report]) -> None:
    html = (tiny_run[0] / "report.html").read_text()
    parser = _Refs()
    parser.feed(html)
    assert "script" not in parser.tags and "link" not in parser.tags and "iframe" not in parser.tags
    images = [value for tag, name, value in parser.refs if tag == "img"]
    assert len(images) == 5  # accuracy, corruptions, robust vs eps, trade-off, channels
    assert all(v.startswith("data:image/png;base64,") for v in images)
    assert [r for r in parser.refs if r[0] != "img"] == []
    assert not re.search(r"url\(|@import|https?://", html.split("<body>", 1)[0])  # the CSS


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_report_html_renders_in_headless_chromium(tiny_run: tuple[Path, Report], tmp_path: Path) -> None:
    assert CHROMIUM is not None
    page = tmp_path / "probe.html"
    page.write_text((tiny_run[0] / "report.html").read_text().replace("</body>", _PROBE + "</body>"))
    common = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000"]
    dom = subprocess.run(
        [*common, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    widths = re.search(r'data-image-widths="([^"]*)"', dom)
    assert widths is not None, dom[:500]
    values = [int(w) for w in widths.group(1).split(",")]
    assert len(values) == 5 and all(w > 100 for w in values), values  # every image decoded
    rows = re.search(r'data-summary-rows="(\d+)"', dom)
    assert rows is not None and int(rows.group(1)) >= 5  # header, MACs, params, target, verdict...
    assert 'id="gates"' in dom and "budget-met" in dom
    # A screenshot to look at (kept in the test's tmp folder).
    shot = tmp_path / "report.png"
    subprocess.run(
        [*common, "--window-size=1280,4000", f"--screenshot={shot}", (tiny_run[0] / "report.html").as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert shot.stat().st_size > 10_000
