"""The deploy examples, run as far as a CPU machine without TensorRT allows.

Their scripts and CI jobs are run for real (through bash, with the ``robustprune`` command), on
copies of the tiny run so that training is never repeated.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import TINY_RECIPE

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "deploy_examples"
NO_TENSORRT = shutil.which("trtexec") is None


def _bash(script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        ["bash", "-c", script, "script", *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _stage_mtimes(run: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in run.glob("*/stage.json")}


def _tiny_with(tmp_path: Path, **sections: Any) -> Path:
    recipe = json.loads(json.dumps(TINY_RECIPE))
    recipe.update(sections)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture
def tensorrt_absent() -> None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return
    pytest.skip("TensorRT is installed here; these tests check the path without it")


def test_desktop_gpu_script_stops_before_writing_without_tensorrt(
    tmp_path: Path, tensorrt_absent: None
) -> None:
    run = tmp_path / "run"
    result = _bash(f"bash {EXAMPLES / 'desktop_gpu' / 'run.sh'} {run}")
    assert result.returncode == 1, result.stderr
    assert "[MISS] validate: runtime tensorrt" in result.stdout
    assert "train -> prune" not in result.stdout  # stopped at the doctor
    assert not run.exists()


def test_jetson_prepare_then_device_steps(
    tiny_run: tuple[Path, dict[str, Any]], tmp_path: Path, tensorrt_absent: None
) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run)
    jetson = yaml.safe_load((EXAMPLES / "jetson" / "recipe.yaml").read_text())
    # The tiny recipe with the Jetson example's deployment sections.
    recipe = _tiny_with(
        tmp_path,
        quantize=dict(jetson["quantize"], samples=60, attack={"eps": "2/255", "steps": 1}),
        engine=jetson["engine"],
        validate=dict(TINY_RECIPE["validate"], runtimes=jetson["validate"]["runtimes"]),
        bench=dict(TINY_RECIPE["bench"], runtimes=jetson["bench"]["runtimes"]),
        gates=jetson["gates"],
    )
    script = str(EXAMPLES / "jetson" / "run.sh")
    before = _stage_mtimes(run)
    prepared = _bash(f"bash {script} --prepare {run}", env={"RECIPE": str(recipe)})
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    after = _stage_mtimes(run)
    assert all(after[s] == before[s] for s in ("train", "prune", "finetune", "export"))  # resumed
    report = json.loads((run / "report.json").read_text())
    targets = {(q["target"], q["scheme"], q["calibration"]) for q in report["quantization"]}
    assert targets == {
        (t, s, c) for t, s in (("onnxruntime", "u8s8"), ("tensorrt", "s8s8")) for c in ("clean", "mixed")
    }
    assert report["engines"] == [] and {e["runtime"] for e in report["evaluations"]} == {
        "torch",
        "onnxruntime",
    }
    # On the device without TensorRT, the doctor stops the script before anything is touched.
    device = _bash(f"bash {script} {run}", env={"RECIPE": str(recipe)})
    assert device.returncode == 1 and "[MISS] bench: runtime tensorrt" in device.stdout
    assert _stage_mtimes(run) == after


def _steps(path: Path) -> list[str]:
    doc = yaml.safe_load(path.read_text())
    if "jobs" in doc:  # GitHub Actions
        return [s["run"] for job in doc["jobs"].values() for s in job["steps"] if "run" in s]
    return [line for job in doc.values() if isinstance(job, dict) for line in job.get("script", [])]


@pytest.mark.parametrize("workflow", ["github-actions.yml", "gitlab-ci.yml"])
def test_ci_jobs_run_the_gate_on_a_release_candidate(
    workflow: str, tiny_run: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    path = EXAMPLES / "ci_gate" / workflow
    steps = [s for s in _steps(path) if not s.startswith("pip install")]
    assert any("gate.sh" in s for s in steps) and any("robustprune doctor" in s for s in steps)
    text = path.read_text()
    assert "gates.junit.xml" in text and "gates.junit.xml" in (EXAMPLES / "ci_gate" / "gate.sh").read_text()
    run = tmp_path / "rc"
    shutil.copytree(tiny_run[0], run)
    env = {
        "RECIPE": str(_tiny_with(tmp_path)),
        "BASELINE": str(tiny_run[0] / "report.json"),
        "RUN_DIR": str(run),
    }
    results = [_bash(step, env=env) for step in steps]
    assert results[0].returncode == 0, results[0].stderr  # doctor: the CPU runner has what it needs
    gate = results[-1]
    # policy.yaml asks for 3.8x fewer MACs; the tiny run has 2x: that floor fails. The candidate
    # is its own baseline, so no regression gate may fail.
    assert gate.returncode == 1, gate.stderr[-2000:]
    fails = [line for line in gate.stdout.splitlines() if line.startswith("FAIL")]
    assert any(line.startswith("FAIL models.pruned.macs_reduction") for line in fails)
    assert not any("vs baseline" in line for line in fails)
    assert f'failures="{len(fails)}"' in (run / "gates.junit.xml").read_text()


def test_the_workflows_keep_a_baseline_that_the_main_branch_writes_and_merge_requests_read(
    tmp_path: Path,
) -> None:
    """Issue 23 hole 14: both workflows needed a baseline report that nothing created, so a
    project's first CI run exited 2. The main branch's job now bootstraps and updates it."""
    github = yaml.safe_load((EXAMPLES / "ci_gate" / "github-actions.yml").read_text())
    triggers = github[True]  # YAML 1.1 reads the key `on` as True
    assert triggers["push"]["branches"] == ["main"] and "pull_request" in triggers
    job = github["jobs"]["gate"]
    assert "github.event_name == 'push'" in job["env"]["WRITE_BASELINE"]
    uses = [step.get("uses", "") for step in job["steps"]]
    restore, gate = (
        uses.index("actions/cache/restore@v4"),
        next(i for i, step in enumerate(job["steps"]) if "gate.sh" in step.get("run", "")),
    )
    save = uses.index("actions/cache/save@v4")
    assert restore < gate < save and "push" in job["steps"][save]["if"]
    assert (
        job["steps"][restore]["with"]["path"] == job["steps"][save]["with"]["path"] == "${{ env.BASELINE }}"
    )

    gitlab = yaml.safe_load((EXAMPLES / "ci_gate" / "gitlab-ci.yml").read_text())["robustness-gate"]
    main_rule = next(rule for rule in gitlab["rules"] if "CI_DEFAULT_BRANCH" in rule["if"])
    assert main_rule["variables"]["WRITE_BASELINE"] == "1" and gitlab["variables"]["WRITE_BASELINE"] == "0"
    assert "$BASELINE" in gitlab["artifacts"]["paths"]
    assert any("jobs/artifacts/$CI_DEFAULT_BRANCH/raw/$BASELINE" in line for line in gitlab["before_script"])

    # A merge request's job without a baseline stops at once with what to do, before the run.
    script = EXAMPLES / "ci_gate" / "gate.sh"
    missing = _bash(f"bash {script} recipe.yaml {tmp_path / 'none.json'} {tmp_path / 'run'}", env={})
    assert missing.returncode == 2 and "run the main branch's job first" in missing.stderr
    assert not (tmp_path / "run").exists()
