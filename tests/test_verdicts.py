"""Verdicts that cannot pass by accident: exit codes, stale reports, recipe hashes, the CI
script, GitHub annotations, and comparing two reports."""

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
from toolchain import commands
from toolchain.cli import main
from toolchain.errors import UserError
from toolchain.report.schema import (
    AttackRow,
    Evaluation,
    GateResult,
    LatencyRow,
    Models,
    PrunedModel,
    Report,
    RobustAccuracy,
)

GATE_SH = Path(__file__).resolve().parent.parent / "deploy_examples" / "ci_gate" / "gate.sh"


def _boom(*_: Any, **__: Any) -> int:
    raise RuntimeError("tensor shapes went sideways\nsecond line of detail")


def test_an_internal_error_is_exit_3_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(commands, "run", _boom)
    assert main(["run", "recipe.yaml"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "robustprune: internal error: RuntimeError: tensor shapes went sideways. "
        "This is a bug; re-run with --debug for the traceback"
    ]
    # --debug shows the traceback and keeps the exit code.
    assert main(["--debug", "run", "recipe.yaml"]) == 3
    err = capsys.readouterr().err
    assert "Traceback" in err and "second line of detail" in err


def test_bad_input_with_debug_is_still_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def bad(*_: Any, **__: Any) -> int:
        raise UserError("recipe 'x.yaml' not found")

    monkeypatch.setattr(commands, "run", bad)
    assert main(["--debug", "run", "x.yaml"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().endswith("robustprune: error: recipe 'x.yaml' not found")


def _write_recipe(tmp_path: Path, recipe: dict[str, Any], name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def _completed_copy(tiny_run: tuple[Path, Report], out: Path) -> Path:
    """A copy of the tiny run directory whose report.json is the tiny recipe's completed one
    (other tests re-run the shared directory with other recipes)."""
    shutil.copytree(tiny_run[0], out)
    (out / "report.json").write_text(json.dumps(tiny_run[1].to_json()))
    return out / "report.json"


@pytest.mark.e2e
def test_a_run_that_crashes_leaves_no_report_that_gate_accepts(
    tiny_run: tuple[Path, Report], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import toolchain.robustness.suite as suite

    out = tmp_path / "run"
    report = _completed_copy(tiny_run, out)
    recipe = _write_recipe(tmp_path, TINY_RECIPE)
    assert main(["gate", str(report), "--recipe", str(recipe)]) == 0  # the previous, completed run

    # The release candidate changes the export and crashes in validation, after export wrote
    # its new ONNX files.
    changed = json.loads(json.dumps(TINY_RECIPE))
    changed["export"]["parity_samples"] = 30
    candidate = _write_recipe(tmp_path, changed, "candidate.yaml")
    monkeypatch.setattr(suite, "evaluate", _boom)  # the one validation engine
    before = (out / "export" / "pruned.onnx").stat().st_mtime_ns
    assert main(["run", str(candidate), "--out", str(out), "--no-progress"]) == 3
    assert (out / "export" / "pruned.onnx").stat().st_mtime_ns != before  # artifacts were written

    stale = json.loads(report.read_text())
    assert stale["status"] == "stale" and stale["passed"] is False
    assert not (out / "report.html").exists() and not (out / "report.md").exists()
    assert main(["gate", str(report)]) == 2
    assert main(["gate", str(report), "--recipe", str(candidate)]) == 2


@pytest.mark.e2e
def test_gate_refuses_a_report_from_another_recipe(
    tiny_run: tuple[Path, Report], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = _completed_copy(tiny_run, tmp_path / "run")
    other = json.loads(json.dumps(TINY_RECIPE))
    other["validate"]["samples"] = 61
    assert main(["gate", str(report), "--recipe", str(_write_recipe(tmp_path, other))]) == 2
    assert "was produced by another recipe" in capsys.readouterr().err
    assert (
        main(["gate", str(report), "--recipe", str(_write_recipe(tmp_path, TINY_RECIPE, "same.yaml"))]) == 0
    )


def _report(clean: float, robust: float, p50: float, passed: bool = True) -> Report:
    return Report(
        status="completed",
        recipe_sha256="a" * 64,
        models=Models(pruned=PrunedModel(macs=2_500_000, macs_reduction=4.2, target={"macs_reduction": 4.0})),
        evaluations=[
            Evaluation(
                model="pruned",
                runtime="onnxruntime",
                samples=500,
                clean_accuracy=clean,
                nonfinite_logits=0,
                attacks=[AttackRow(name="pgd", mode="transfer", norm="linf", eps=4 / 255, accuracy=robust)],
                robust_accuracy=[
                    RobustAccuracy(norm="linf", eps=4 / 255, accuracy=robust, samples=500, attacks=["pgd"])
                ],
            )
        ],
        latency=[LatencyRow(model="pruned", runtime="onnxruntime", batch=1, p50_ms=p50)],
        passed=passed,
    )


def test_compare_shows_both_reports_and_their_differences(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_report(0.70, 0.55, 1.0).to_json()))
    b.write_text(json.dumps(_report(0.68, 0.58, 0.8, passed=False).to_json()))
    assert main(["compare", str(a), str(b)]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = {line.split("  ")[0].strip(): line for line in lines[2:]}
    assert (
        "70.0%" in row["pruned/onnxruntime/fp32 clean"] and "-2.0 pts" in row["pruned/onnxruntime/fp32 clean"]
    )
    assert "+3.0 pts" in row["pruned/onnxruntime/fp32 robust linf 4/255"]
    assert "0.80x" in row["p50 pruned/onnxruntime/fp32 batch 1"]
    assert "FAILED" in row["verdict"] and "changed" in row["verdict"]
    assert main(["compare", str(a), str(b), "--format", "md"]) == 0
    md = capsys.readouterr().out.splitlines()
    assert md[0].startswith("| ") and md[1].startswith("|---")
    assert "| pruned/onnxruntime/fp32 clean | 70.0% | 68.0% | -2.0 pts |" in md
    assert main(["compare", str(a), str(tmp_path / "none.json")]) == 2


def test_a_failed_gate_is_a_github_annotation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "report.json"
    path.write_text(json.dumps(_report(0.70, 0.55, 1.0).to_json()))
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump({"gates": [{"metric": "models.pruned.macs_reduction", "threshold": 5}]}))
    monkeypatch.delenv("GITHUB_ACTIONS", raising=False)
    assert main(["gate", str(path), "--policy", str(policy)]) == 1
    assert "::error" not in capsys.readouterr().out
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    assert main(["gate", str(path), "--policy", str(policy)]) == 1
    errors = [line for line in capsys.readouterr().out.splitlines() if line.startswith("::error")]
    assert len(errors) == 2  # the policy gate, and budget-met (no target_met recorded)
    assert any("models.pruned.macs_reduction >= 5" in e for e in errors)


def _stub_robustprune(bin_dir: Path, run_exit: int) -> Path:
    """A fake ``robustprune`` that logs its arguments and exits as told for ``run``."""
    log = bin_dir / "calls.log"
    bin_dir.mkdir(exist_ok=True)
    stub = bin_dir / "robustprune"
    stub.write_text(f'#!/usr/bin/env bash\necho "$*" >> {log}\n[ "$1" = run ] && exit {run_exit}\nexit 0\n')
    stub.chmod(0o755)
    return log


@pytest.mark.parametrize(
    ("run_exit", "expected", "gated"), [(3, 3, False), (2, 2, False), (1, 0, True), (0, 0, True)]
)
def test_gate_script_never_gates_a_crashed_run(
    tmp_path: Path, run_exit: int, expected: int, gated: bool
) -> None:
    log = _stub_robustprune(tmp_path / "bin", run_exit)
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    (tmp_path / "baseline.json").write_text("{}")  # gate.sh refuses a missing baseline up front
    result = subprocess.run(
        ["bash", str(GATE_SH), "recipe.yaml", "baseline.json", str(tmp_path / "rc")],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    calls = log.read_text().splitlines()
    assert result.returncode == expected, result.stderr
    assert calls[0].startswith("run recipe.yaml --out")
    if gated:
        (gate,) = calls[1:]
        assert gate.startswith(f"gate {tmp_path / 'rc'}/report.json --recipe recipe.yaml --policy ")
        assert "--baseline baseline.json --junit" in gate
    else:
        assert len(calls) == 1 and "no release" in result.stderr


def _run_dir_with_reports(root: Path) -> list[Path]:
    """A run directory whose report.json and export/validate-pruned/report.json are completed,
    passing reports (as a previous release's run and its ``validate`` left them)."""
    passing = _report(0.70, 0.55, 1.0)
    assert passing.models.pruned is not None
    passing.models.pruned.target_met = True
    passing.gates = [GateResult(metric="models.pruned.macs_reduction", threshold=4.0, value=4.2, passed=True)]
    reports = [root / "report.json", root / "export" / "validate-pruned" / "report.json"]
    for report in reports:
        report.parent.mkdir(parents=True, exist_ok=True)
        (report.parent / "run.json").write_text(json.dumps({"tool": "robustprune"}))
        report.write_text(json.dumps(passing.to_json()))
    return reports


def _assert_stale(reports: list[Path]) -> None:
    for report in reports:
        data = json.loads(report.read_text())
        assert (data["status"], data["passed"]) == ("stale", False), report
        assert main(["gate", str(report)]) == 2


@pytest.mark.parametrize(
    "change",
    [
        {"model": {"arch": "convnet", "checkpoint": "missing.pt"}},  # refused in preflight
        {"train": {"epochs": 1, "no_such_key": 1}},  # refused while loading the recipe
    ],
)
def test_a_run_refused_before_it_starts_leaves_every_old_report_stale(
    tmp_path: Path, change: dict[str, Any]
) -> None:
    out = tmp_path / "run"
    reports = _run_dir_with_reports(out)
    assert [main(["gate", str(r)]) for r in reports] == [0, 0]
    recipe = _write_recipe(tmp_path, {**TINY_RECIPE, **change})
    assert main(["run", str(recipe), "--out", str(out), "--no-progress"]) == 2
    _assert_stale(reports)


def test_validate_refused_before_it_starts_leaves_its_old_report_stale(tmp_path: Path) -> None:
    (report,) = _run_dir_with_reports(tmp_path / "validate-pruned")[:1]
    recipe = _write_recipe(tmp_path, TINY_RECIPE)
    engine = str(tmp_path / "pruned.onnx")  # gone: the export was removed
    out = str(report.parent)
    assert main(["validate", "--engine", engine, "--recipe", str(recipe), "--out", out]) == 2
    _assert_stale([report])


def test_gate_refuses_a_stale_baseline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report, baseline = tmp_path / "report.json", tmp_path / "baseline.json"
    report.write_text(json.dumps(_report(0.70, 0.55, 1.0).to_json()))
    baseline.write_text(json.dumps({**_report(0.70, 0.55, 1.0).to_json(), "status": "stale"}))
    policy = tmp_path / "policy.yaml"
    gates = [{"metric": "models.pruned.macs_reduction", "threshold": 1.0, "relative": "ratio"}]
    policy.write_text(yaml.safe_dump({"gates": gates}))
    assert main(["gate", str(report), "--policy", str(policy), "--baseline", str(baseline)]) == 2
    assert "baseline" in capsys.readouterr().err


def test_write_baseline_bootstraps_the_first_run_then_follows_passing_reports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def write(name: str, clean: float) -> Path:
        report = _report(clean, 0.55, 1.0)
        assert report.models.pruned is not None
        report.models.pruned.target_met = True
        path = tmp_path / name
        path.write_text(json.dumps(report.to_json()))
        return path

    policy = tmp_path / "policy.yaml"
    metric = "evaluations[model=pruned,runtime=onnxruntime].clean_accuracy"
    gates = [
        {"metric": metric, "threshold": 0.5},
        {"metric": metric, "threshold": -0.02, "relative": "delta"},
    ]
    policy.write_text(yaml.safe_dump({"gates": gates}))
    baseline = tmp_path / "baselines" / "report.json"
    first, better, worse = write("first.json", 0.70), write("better.json", 0.72), write("worse.json", 0.60)
    gate = ["gate", "--policy", str(policy), "--baseline", str(baseline)]
    assert main([*gate[:1], str(first), *gate[1:]]) == 2  # a missing baseline fails closed...
    assert main([*gate[:1], str(first), *gate[1:], "--write-baseline"]) == 0  # ...unless bootstrapping
    assert baseline.read_bytes() == first.read_bytes()
    assert main([*gate[:1], str(better), *gate[1:], "--write-baseline"]) == 0
    assert baseline.read_bytes() == better.read_bytes()  # the baseline follows passing reports
    assert main([*gate[:1], str(worse), *gate[1:], "--write-baseline"]) == 1  # 12 points lost
    assert baseline.read_bytes() == better.read_bytes()  # a failed report never becomes it
