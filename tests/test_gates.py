"""Gates: metric paths, operators, relative gates and fail-closed behaviour."""

from __future__ import annotations

from pathlib import Path
from xml.etree import ElementTree as ET

import pytest

from toolchain.report.gates import MetricNotFound, evaluate_gates, resolve_metric
from toolchain.report.junit import write_junit

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
    assert [r["passed"] for r in results] == [True, False, False]
    assert results[2]["value"] is None and "not in the report" in results[2]["error"]


def test_relative_gates_against_a_baseline() -> None:
    baseline = {"evaluations": [{"model": "pruned", "clean_accuracy": 0.88}]}
    gate = {
        "metric": "evaluations[model=pruned].clean_accuracy",
        "op": ">=",
        "threshold": -0.02,
        "relative": "delta",
    }
    (row,) = evaluate_gates(REPORT, [gate], baseline)
    assert row["value"] == pytest.approx(-0.03) and not row["passed"]
    ratio = dict(gate, relative="ratio", threshold=0.95)
    (row,) = evaluate_gates(REPORT, [ratio], baseline)
    assert row["value"] == pytest.approx(0.85 / 0.88) and row["passed"]
    (row,) = evaluate_gates(REPORT, [gate], None)
    assert not row["passed"] and "baseline" in row["error"]


def test_junit_xml_lists_every_gate(tmp_path: Path) -> None:
    results = evaluate_gates(
        REPORT,
        [
            {"metric": "models.pruned.macs_reduction", "op": ">=", "threshold": 4.0},
            {"metric": "nope", "op": ">=", "threshold": 1},
        ],
    )
    path = tmp_path / "gates.xml"
    write_junit(path, results)
    suite = ET.parse(path).getroot()
    assert suite.get("tests") == "2" and suite.get("failures") == "1"
    assert len(suite.findall("testcase/failure")) == 1
