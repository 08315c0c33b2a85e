"""Gates: metric paths, operators, relative gates and fail-closed behaviour."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

import pytest

from toolchain.report.assemble import finish, target_met
from toolchain.report.gates import MetricNotFound, evaluate_gates, intrinsic_gates, resolve_metric, verdict
from toolchain.report.junit import github_annotations, write_junit
from toolchain.report.schema import (
    Environment,
    Evaluation,
    ExportParity,
    IntrinsicGate,
    Models,
    Parity,
    PrunedModel,
    Report,
)

REPORT = {
    "schema": "robustprune.report/1",
    "models": {"pruned": {"macs_reduction": 4.1}},
    "evaluations": [
        {"model": "dense", "runtime": "torch", "clean_accuracy": 0.9, "attacks": []},
        {
            "model": "pruned",
            "runtime": "onnxruntime",
            "clean_accuracy": 0.85,
            "attacks": [{"name": "pgd", "mode": "transfer", "accuracy": 0.4}],
            "corruptions": {"per_corruption": {"fog": {"5": 0.3}}},
        },
    ],
    "latency": [{"model": "pruned", "batch": 1, "p50_ms": 1.5}],
}


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("models.pruned.macs_reduction", 4.1),
        ("evaluations[model=pruned,runtime=onnxruntime].clean_accuracy", 0.85),
        ("evaluations[model=pruned].attacks[name=pgd,mode=transfer].accuracy", 0.4),
        ("evaluations[model=pruned].corruptions.per_corruption.fog.5", 0.3),
        ("latency[model=pruned,batch=1].p50_ms", 1.5),
    ],
)
def test_resolve_metric(path: str, value: float) -> None:
    assert resolve_metric(REPORT, path) == pytest.approx(value)


@pytest.mark.parametrize(
    "path",
    [
        "models.dense.macs",  # missing
        "evaluations.clean_accuracy",  # list without selector -> not a dict
        "evaluations[runtime=tensorrt].clean_accuracy",  # no match
        "evaluations[model=dense,runtime=torch].attacks",  # not a number
        "models.pruned[model=x].macs_reduction",  # selector on a dict
        "schema",  # a string
    ],
)
def test_unresolvable_metrics_raise(path: str) -> None:
    with pytest.raises(MetricNotFound):
        resolve_metric(REPORT, path)


def test_ambiguous_selector_is_an_error() -> None:
    report = {"evaluations": [{"model": "a", "x": 1}, {"model": "a", "x": 2}]}
    with pytest.raises(MetricNotFound, match="matches 2"):
        resolve_metric(report, "evaluations[model=a].x")


def test_gates_pass_fail_and_fail_closed() -> None:
    gates = [
        {"metric": "models.pruned.macs_reduction", "op": ">=", "threshold": 4.0},
        {"metric": "evaluations[model=pruned].clean_accuracy", "op": ">", "threshold": 0.9},
        {"metric": "models.pruned.does_not_exist", "op": "<", "threshold": 1e9},
    ]
    results = evaluate_gates(REPORT, gates)
    assert [r.passed for r in results] == [True, False, False]
    assert results[2].value is None and "not in the report" in (results[2].error or "")


def test_relative_gates_against_a_baseline() -> None:
    baseline = {"evaluations": [{"model": "pruned", "clean_accuracy": 0.88}]}
    gate = {
        "metric": "evaluations[model=pruned].clean_accuracy",
        "op": ">=",
        "threshold": -0.02,
        "relative": "delta",
    }
    (row,) = evaluate_gates(REPORT, [gate], baseline)
    assert row.value == pytest.approx(-0.03) and not row.passed
    ratio = dict(gate, relative="ratio", threshold=0.95)
    (row,) = evaluate_gates(REPORT, [ratio], baseline)
    assert row.value == pytest.approx(0.85 / 0.88) and row.passed
    (row,) = evaluate_gates(REPORT, [gate], None)
    assert not row.passed and "baseline" in (row.error or "")


def test_junit_xml_lists_every_gate(tmp_path: Path) -> None:
    results = evaluate_gates(
        REPORT,
        [
            {"metric": "models.pruned.macs_reduction", "op": ">=", "threshold": 4.0},
            {"metric": "nope", "op": ">=", "threshold": 1},
        ],
    )
    intrinsic = [IntrinsicGate(name="finite-logits", passed=False, detail="pruned/onnxruntime/fp32: 3")]
    path = tmp_path / "gates.xml"
    write_junit(path, results, intrinsic)
    suite = ET.parse(path).getroot()
    assert suite.get("tests") == "3" and suite.get("failures") == "2"
    assert [c.get("name") for c in suite.findall("testcase") if c.find("failure") is not None] == [
        "intrinsic finite-logits",
        "nope >= 1",
    ]


def test_github_annotations_name_each_failed_gate() -> None:
    results = evaluate_gates(REPORT, [{"metric": "models.pruned.macs_reduction", "op": ">=", "threshold": 5}])
    intrinsic = [IntrinsicGate(name="budget-met", passed=True, detail="met")]
    (line,) = github_annotations(results, intrinsic, "runs/rc/report.json")
    assert line.startswith("::error title=robustprune gate failed (runs/rc/report.json)::")
    assert "models.pruned.macs_reduction >= 5: value 4.1 does not satisfy >= 5" in line
    assert github_annotations(evaluate_gates(REPORT, []), intrinsic, "r") == []


def _pruned(reduction: float, target: float | None, tolerance: float = 0.05) -> Report:
    met = target_met({"macs_reduction": target} if target else None, tolerance, {"macs_reduction": reduction})
    return Report(
        models=Models(
            pruned=PrunedModel(
                macs_reduction=reduction,
                target={"macs_reduction": target} if target else None,
                tolerance=tolerance,
                target_met=met,
            )
        )
    )


@pytest.mark.parametrize(
    ("reduction", "target", "passed"),
    [
        (4.19, 4.0, True),
        (3.81, 4.0, True),  # within 5% of the target
        (3.79, 4.0, False),  # missed the budget: the run fails whatever its recipe says
        (6.0, 4.0, True),  # more reduction than asked is within budget
        (4.0, None, False),  # no target recorded: fail closed
    ],
)
def test_a_missed_budget_fails_the_intrinsic_gate(
    reduction: float, target: float | None, passed: bool
) -> None:
    (budget, finite) = intrinsic_gates(_pruned(reduction, target))
    assert budget.name == "budget-met" and budget.passed is passed
    assert finite.passed  # no evaluations: nothing non-finite
    assert verdict([], [budget, finite]) is passed


def test_intrinsic_parity_gate_checks_fp32_engines_and_export_parity() -> None:
    def ev(runtime: str, precision: str, agreement: float) -> Evaluation:
        return Evaluation(
            model="pruned",
            runtime=runtime,
            precision=precision,
            nonfinite_logits=0,
            parity=Parity(top1_agreement=agreement, max_abs_diff=0.0, compared=100),
        )

    report = Report(
        evaluations=[
            ev("torch", "fp32", 1.0),
            ev("onnxruntime", "fp32", 1.0),
            ev("onnxruntime", "int8", 0.995),
        ]
    )
    assert {g.name: g.passed for g in intrinsic_gates(report)} == {
        "engine-parity": True,
        "finite-logits": True,
    }
    report.evaluations[1].parity.top1_agreement = 0.99  # type: ignore[union-attr]
    assert not {g.name: g for g in intrinsic_gates(report)}["engine-parity"].passed
    report.evaluations[1].parity.top1_agreement = 1.0  # type: ignore[union-attr]
    report.parity = {"pruned": ExportParity(top1_agreement=1.0, max_abs_diff=None, samples=64)}
    gate = {g.name: g for g in intrinsic_gates(report)}["engine-parity"]
    assert not gate.passed and "export pruned" in gate.detail
    # A count the report does not have fails closed.
    report.evaluations[0].nonfinite_logits = None
    assert not {g.name: g for g in intrinsic_gates(report)}["finite-logits"].passed


def _evaluated(runtime: str = "onnxruntime", samples: int = 60) -> Report:
    return Report(
        environment=Environment(threads=2),
        evaluations=[Evaluation(model="pruned", runtime=runtime, samples=samples, nonfinite_logits=0)],
    )


GATE = {"metric": "environment.threads", "op": ">=", "threshold": 1}  # holds in every report here


@pytest.mark.parametrize(
    ("report", "gates", "reason"),
    [
        (Report(environment=Environment(threads=2)), [GATE], "no evaluation of an exported file"),
        (_evaluated("torch"), [GATE], "no evaluation of an exported file"),  # the engine never ran
        (_evaluated(samples=0), [GATE], "no evaluation of an exported file"),
        (_evaluated(), [], "no gates"),  # gates: []
    ],
)
def test_nothing_evaluated_or_nothing_gated_does_not_pass(
    report: Report, gates: list[Any], reason: str
) -> None:
    finish(report, gates)
    coverage = {g.name: g for g in report.intrinsic_gates}["evaluated-and-gated"]
    assert not coverage.passed and reason in coverage.detail and "allow_unverified" in coverage.detail
    assert report.passed is False
    # The opt-out passes it, and says so.
    finish(report, gates, allow_unverified=True)
    coverage = {g.name: g for g in report.intrinsic_gates}["evaluated-and-gated"]
    assert coverage.passed and coverage.detail.startswith("allowed by allow_unverified: ") and report.passed


def test_an_evaluated_and_gated_report_passes_the_coverage_gate() -> None:
    report = finish(_evaluated(), [GATE])
    coverage = {g.name: g for g in report.intrinsic_gates}["evaluated-and-gated"]
    assert coverage.passed and coverage.detail == "1 gate on 1 evaluation of an exported file (60 images)"
    assert report.passed


def test_a_policy_with_no_gates_fails_the_gate_command_unless_allowed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from toolchain.cli import main

    report = tmp_path / "report.json"
    report.write_text(json.dumps(finish(_evaluated(), [GATE]).to_json()))
    policy = tmp_path / "policy.yaml"
    policy.write_text("gates: []\n")
    assert main(["gate", str(report)]) == 0
    assert main(["gate", str(report), "--policy", str(policy)]) == 1
    assert "FAIL intrinsic evaluated-and-gated: no gates" in capsys.readouterr().out
    assert main(["gate", str(report), "--policy", str(policy), "--allow-unverified"]) == 0
    assert (
        "PASS intrinsic evaluated-and-gated: allowed by allow_unverified: no gates" in capsys.readouterr().out
    )


def test_allow_unverified_is_a_recipe_key_that_leaves_other_recipes_hashes_alone() -> None:
    from toolchain.recipe import recipe_from_dict

    assert recipe_from_dict({}).allow_unverified is False
    assert recipe_from_dict({"allow_unverified": True}).allow_unverified is True
    assert recipe_from_dict({}).sha256() == recipe_from_dict({"allow_unverified": False}).sha256()
    assert recipe_from_dict({}).sha256() != recipe_from_dict({"allow_unverified": True}).sha256()
