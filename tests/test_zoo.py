"""bench/zoo.py on two small models: trials in watched subprocesses (two at once), the JSON,
resuming without rerunning, the memory watchdog, and the README table written between markers."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ZOO = REPO / "bench" / "zoo.py"
MODELS = ["tests.tiny_models:AuxNet", "tests.user_models:make"]

pytestmark = pytest.mark.e2e


def _zoo(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(ZOO), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _module():  # bench/ is not a package
    spec = importlib.util.spec_from_file_location("zoo_bench", ZOO)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sweep_writes_records_resumes_and_fills_the_readme(tmp_path: Path) -> None:
    out, readme = tmp_path / "zoo.json", tmp_path / "README.md"
    readme.write_text(
        "a\n<!-- zoo:table -->old<!-- /zoo:table -->\nb <!-- zoo:summary -->x<!-- /zoo:summary -->\n"
    )
    _zoo("--models", *MODELS, "--size", "16", "--jobs", "2", "--out", str(out), "--readme", str(readme))
    payload = json.loads(out.read_text())
    results = {r["model"]: r for r in payload["results"]}
    assert set(results) == set(MODELS)
    for r in results.values():
        assert r["outcome"] == "works", r["reason"]
        assert r["macs_reduction"] == pytest.approx(2.0, rel=0.05) and r["top1_agreement"] == 1.0
        assert r["jobs"] == 2 and r["seconds"] > 0
        # Its own process's peak: more than the interpreter with torch, less than the cap.
        assert 100 * 2**20 < r["peak_rss_bytes"] < 12 * 2**30
    assert payload["summary"]["works"] == 2 and payload["summary"]["works_share"] == 1.0
    # Every torchvision classifier is listed as not run yet: the JSON says what the sweep lacks.
    assert len(payload["summary"]["not_run"]) == len(payload["models"]) - 2 >= 80
    text = readme.read_text()
    assert text.startswith("a\n<!-- zoo:table -->\n| model |") and "old" not in text
    assert "| tests.tiny_models:AuxNet | 16 | works | " in text
    assert (
        "b <!-- zoo:summary -->2 of 2 models swept work (100%), 0 refused before training, 0 failed;" in text
    )
    assert "not run yet: alexnet, " in text

    # A second run finds both done and runs nothing.
    again = _zoo("--models", *MODELS, "--size", "16", "--out", str(out))
    assert json.loads(out.read_text())["results"] == payload["results"]
    assert "works" not in again.stderr  # no trial was logged

    # The watchdog kills a trial above its memory cap and says so.
    _zoo("--models", MODELS[1], "--size", "16", "--redo", "--memory-gb", "0.05", "--out", str(out))
    killed = {r["model"]: r for r in json.loads(out.read_text())["results"]}
    assert killed[MODELS[1]]["outcome"] == "failed"
    assert killed[MODELS[1]]["reason"] == "killed: resident memory above 0.05 GiB"
    assert killed[MODELS[0]] == results[MODELS[0]]  # the other record is kept


def test_readme_without_markers_is_refused() -> None:
    zoo = _module()
    with pytest.raises(ValueError, match="zoo:table"):
        zoo.render_readme("no markers here", {"results": [], "models": []})
