"""The documentation: built strictly, generated parts equal to their sources, every CLI flag and
user error documented, and a README a user reads (short, one install / quickstart / test command)."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
NO_MKDOCS = importlib.util.find_spec("mkdocs") is None
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")


def _render_docs() -> ModuleType:
    spec = importlib.util.spec_from_file_location("render_docs", REPO / "bench" / "render_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _docs_text() -> str:
    return "\n".join(p.read_text() for p in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))])


def test_generated_pages_and_rendered_figures_match_their_sources() -> None:
    problems = _render_docs().check()
    assert problems == [], "\n".join(problems) + "\nrun `python bench/render_docs.py` and commit the result"


def test_a_figure_that_disagrees_with_its_json_is_caught(tmp_path: Path) -> None:
    render_docs = _render_docs()
    shutil.copytree(REPO / "docs", tmp_path / "docs")
    shutil.copy(REPO / "README.md", tmp_path / "README.md")
    shutil.copytree(REPO / "bench" / "results", tmp_path / "bench" / "results")
    assert render_docs.check(tmp_path) == []
    page = tmp_path / "docs" / "benchmarks" / "latency.md"
    block = re.search(r"<!-- render:latency.budget -->(.*?)<!-- /render", page.read_text(), re.DOTALL)
    assert block is not None
    edited = block.group(1).replace("×", "x", 1)  # one figure typed by hand
    page.write_text(page.read_text().replace(block.group(1), edited))
    assert render_docs.check(tmp_path) == ["docs/benchmarks/latency.md differs from what its sources give"]
    with pytest.raises(KeyError, match=r"unknown render block 'no\.such'"):
        render_docs.render_text("<!-- render:no.such -->x<!-- /render:no.such -->", "page.md")


@pytest.mark.skipif(NO_MKDOCS, reason="mkdocs not installed (the [dev] extra)")
def test_docs_site_builds_strictly(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "reference" / "recipe" / "index.html").is_file()


def _help(*verb: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "toolchain", *verb, "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_every_cli_subcommand_and_flag_is_documented() -> None:
    top = _help()
    verbs = re.search(r"\{([a-z,]+)\}", top)
    assert verbs is not None
    docs = _docs_text()
    missing = []
    for verb in verbs.group(1).split(","):
        if f"robustprune {verb}" not in docs:
            missing.append(f"robustprune {verb}")
        flags = set(FLAG.findall(_help(verb))) - {"--help"}
        missing += [f"robustprune {verb} {flag}" for flag in sorted(flags) if flag not in docs]
    missing += [f"robustprune {flag}" for flag in set(FLAG.findall(top)) - {"--help"} if flag not in docs]
    assert missing == []


def test_every_user_error_class_is_in_troubleshooting() -> None:
    import toolchain.commands
    import toolchain.pipeline  # noqa: F401
    from exporters.errors import UserError

    def subclasses(cls: type) -> list[type]:
        return [c for s in cls.__subclasses__() for c in (s, *subclasses(s))]

    page = (REPO / "docs" / "troubleshooting.md").read_text()
    names = sorted({c.__name__ for c in subclasses(UserError)})
    assert len(names) >= 10
    assert [n for n in names if f"`{n}`" not in page] == []


def _section_commands(readme: str, title: str) -> list[str]:
    section = readme.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.DOTALL)
    return [line for block in blocks for line in block.strip().splitlines()]


def test_readme_is_short_with_one_install_quickstart_and_test_command() -> None:
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) < 300
    assert _section_commands(readme, "Install") == ["pip install ."]
    assert _section_commands(readme, "Quickstart") == ["robustprune run deploy_examples/quickstart.yaml"]
    (test,) = _section_commands(readme, "Test")
    assert test == 'pip install -e ".[dev]" && pytest'
    ci = (REPO / ".ci" / "run").read_text()
    # CI runs the README's test command: the same editable install (a superset of its extras), then pytest.
    assert re.search(r'^pip install -e "\.\[dev(,\w+)*\]"$', ci, re.MULTILINE)
    assert re.search(r"^pytest$", ci, re.MULTILINE)


def test_user_docs_carry_no_team_notes() -> None:
    docs = _docs_text()
    for phrase in ("cpu.lock", "flock ", "the issue", "issue 9", " UTC"):
        assert phrase not in docs, phrase
