"""Gates: metric paths, operators, relative gates and fail-closed behaviour."""

from __future__ import annotations

from pathlib import Path
from xml.etree import ElementTree as ET

import pytest

from toolchain.report.assemble import target_met
from toolchain.report.gates import MetricNotFound, evaluate_gates, intrinsic_gates, resolve_metric, verdict
from toolchain.report.junit import github_annotations, write_junit
from toolchain.report.schema import (
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
