"""Regenerate every generated part of the documentation from its source, or check it.

    python bench/render_docs.py            # rewrite the reference pages and every rendered block
    python bench/render_docs.py --check    # exit 1 and name what differs (the test suite runs it)

Two kinds of generated content:

* **Reference pages** (``docs/reference/recipe.md``, ``report-json.md``, ``cli.md``), written
  whole from the live code by :mod:`toolchain.reference`.
* **Rendered blocks**: in ``README.md`` and any ``docs/**/*.md``, the text between
  ``<!-- render:NAME -->`` and ``<!-- /render:NAME -->`` is what the renderer ``NAME`` gives
  from its JSON in ``bench/results/``. Every benchmark figure in the docs lives in such a block,
  so a figure cannot disagree with its JSON. A block may sit inside a sentence.

A new figure: add a function to :data:`RENDERERS` (in ``bench/renderers*.py``) that reads its JSON
and returns Markdown, put the markers where it goes, and run this script.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Run as a script from anywhere: this checkout's toolchain, and the renderers beside this file.
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from renderers import RENDERERS  # noqa: E402

from toolchain.reference import (  # noqa: E402
    cli_reference,
    missing_descriptions,
    recipe_reference,
    report_reference,
)

BLOCK = re.compile(r"<!-- render:([\w.-]+) -->(.*?)<!-- /render:\1 -->", re.DOTALL)

PAGES: dict[str, Callable[[], str]] = {
    "docs/reference/recipe.md": recipe_reference,
    "docs/reference/report-json.md": report_reference,
    "docs/reference/cli.md": cli_reference,
}


#: Plots the benchmarks draw from their JSON, copied where the docs site can serve them.
PLOTS = (
    "aer-fashion-mnist-full-test-matrix-clean.png",
    "aer-fashion-mnist-full-test-matrix-pgd20.png",
    "aer-fashion-mnist-full-test-matrix-corruptions_mean.png",
    "aer-signs-reduced-test-pgd20.png",
)
PLOT_DIR = "docs/assets/bench"


def documents(root: Path = REPO) -> list[Path]:
    """README.md and every Markdown page under docs/."""
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def render_text(text: str, where: str) -> str:
    """``text`` with every rendered block replaced by what its renderer gives now.

    Raises:
        KeyError: a block names no known renderer.
    """

    def fill(match: re.Match[str]) -> str:
        name, old = match.group(1), match.group(2)
        if name not in RENDERERS:
            raise KeyError(f"{where}: unknown render block {name!r}; known: {', '.join(sorted(RENDERERS))}")
        body = RENDERERS[name]().strip("\n")
        # A block on lines of its own keeps its body on lines of its own; an inline one stays inline.
        if old.startswith("\n"):
            body = f"\n{body}\n"
        return f"<!-- render:{name} -->{body}<!-- /render:{name} -->"

    return BLOCK.sub(fill, text)


def regenerate(root: Path = REPO) -> dict[Path, str]:
    """Every generated file's expected content, by path (only files that have any)."""
    out = {root / path: make() for path, make in PAGES.items()}
    for doc in documents(root):
        if doc in out or not doc.is_file():
            continue
        text = doc.read_text()
        if BLOCK.search(text):
            out[doc] = render_text(text, str(doc.relative_to(root)))
    return out


def check(root: Path = REPO) -> list[str]:
    """What differs from what the sources give (empty when the docs are up to date)."""
    problems = [f"no description: {item}" for item in missing_descriptions()]
    for name in PLOTS:
        copy = root / PLOT_DIR / name
        if not copy.is_file() or copy.read_bytes() != (root / "bench" / "results" / name).read_bytes():
            problems.append(f"{PLOT_DIR}/{name} is not a copy of bench/results/{name}")
    for path, expected in regenerate(root).items():
        current = path.read_text() if path.is_file() else None
        if current != expected:
            problems.append(f"{path.relative_to(root)} differs from what its sources give")
    used = {m.group(1) for doc in documents(root) if doc.is_file() for m in BLOCK.finditer(doc.read_text())}
    problems += [f"renderer {name!r} is used by no page" for name in sorted(set(RENDERERS) - used)]
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if anything differs")
    args = parser.parse_args()
    if args.check:
        problems = check()
        for problem in problems:
            sys.stderr.write(f"render_docs: {problem}\n")
        if problems:
            sys.stderr.write("render_docs: run `python bench/render_docs.py` and commit the result\n")
        return 1 if problems else 0
    for name in PLOTS:
        copy = REPO / PLOT_DIR / name
        data = (REPO / "bench" / "results" / name).read_bytes()
        if not copy.is_file() or copy.read_bytes() != data:
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_bytes(data)
            sys.stdout.write(f"wrote {copy.relative_to(REPO)}\n")
    for path, text in regenerate().items():
        if not path.is_file() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            sys.stdout.write(f"wrote {path.relative_to(REPO)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
