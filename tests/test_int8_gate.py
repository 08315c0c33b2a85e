"""The INT8 gate on by default (every calibration set, agreement and drops), FP16 engines and the
export's parity tolerance held by the engine-parity intrinsic gate."""

from __future__ import annotations

from typing import Any

import pytest

from toolchain.recipe import recipe_from_dict
from toolchain.report.gates import FP16_MIN_AGREEMENT, evaluate_gates, intrinsic_gates
from toolchain.report.quantization import quantization_gates
from toolchain.report.schema import Evaluation, ExportParity, Parity, Report

_QUICK = {"data": {"dataset": "signs"}, "model": {"arch": "convnet"}}


def _recipe(**quantize: Any) -> Any:
    return recipe_from_dict({**_QUICK, "quantize": {"enabled": True, **quantize}})


def _vs_fp32(**change: float) -> dict[str, float]:
    """A file that passes every default limit, with ``change`` applied."""
    values = {
        "top1_agreement": 0.995,
        "top1_agreement_adversarial": 0.98,
        "slowdown": 0.5,
        "clean_drop": 0.004,
        "attack_drop": 0.009,
        "corruption_drop": 0.0,
    }
    return {**values, **change}


def _report(clean: dict[str, float], mixed: dict[str, float]) -> dict[str, Any]:
    rows = [
        {"model": "pruned", "target": "onnxruntime", "calibration": c, "vs_fp32": v}
        for c, v in (("clean", clean), ("mixed", mixed))
    ]
    return {"quantization": rows}


def test_the_int8_gate_is_on_by_default_for_every_calibration_set() -> None:
    gates = quantization_gates(_recipe())
    metrics = {
        (g.metric.split("calibration=")[1].split("]")[0], g.metric.rsplit(".", 1)[1]): g for g in gates
    }
    assert {c for c, _ in metrics} == {"clean", "mixed"}
    assert {(m, metrics["mixed", m].op, metrics["mixed", m].threshold) for _, m in metrics} == {
        ("top1_agreement", ">=", 0.99),
        ("top1_agreement_adversarial", ">=", 0.97),
        ("clean_drop", "<=", 0.005),
        ("attack_drop", "<=", 0.01),
        ("corruption_drop", "<=", 0.01),
        ("slowdown", "<=", 1.0),
    }
    assert quantization_gates(_recipe(gate=None)) == []  # the explicit opt-out
    assert quantization_gates(recipe_from_dict(_QUICK)) == []  # no INT8 files, nothing to gate


@pytest.mark.parametrize(
    ("change", "failing"),
    [
        ({}, None),
        ({"top1_agreement": 0.989}, "top1_agreement"),
        ({"top1_agreement_adversarial": 0.969}, "top1_agreement_adversarial"),
        ({"clean_drop": 0.006}, "clean_drop"),
        ({"attack_drop": 0.011}, "attack_drop"),
        ({"slowdown": 1.2}, "slowdown"),
    ],
)
def test_a_regression_in_either_calibration_set_fails(change: dict[str, float], failing: str | None) -> None:
    gates = quantization_gates(_recipe())
    # The clean set is fine; the regression is in the mixed one only (the old gate judged one set).
    results = evaluate_gates(_report(_vs_fp32(), _vs_fp32(**change)), gates)
    failed = [r.metric for r in results if not r.passed]
    if failing is None:
        assert not failed
    else:
        assert failed == [
            f"quantization[model=pruned,target=onnxruntime,calibration=mixed].vs_fp32.{failing}"
        ]


def test_an_unmeasured_agreement_fails_and_a_named_calibration_is_the_only_one_gated() -> None:
    gates = quantization_gates(_recipe())
    vs = _vs_fp32()
    del vs["top1_agreement_adversarial"]  # no white-box attack in validation: nothing measured
    results = evaluate_gates(_report(_vs_fp32(), vs), gates)
    (missing,) = [r for r in results if not r.passed]
    assert missing.value is None and "top1_agreement_adversarial" in missing.metric
    only = quantization_gates(_recipe(gate={"calibration": "clean"}))
    assert only and all("calibration=clean" in g.metric for g in only)


def test_detection_int8_is_held_to_the_agreement_of_its_detections_drops_and_speed() -> None:
    recipe = recipe_from_dict(
        {
            "task": "detection",
            "data": {"dataset": "driving-scenes"},
            "model": {"arch": "detnet"},
            "quantize": {"enabled": True},
        }
    )
    names = {g.metric.rsplit(".", 1)[1] for g in quantization_gates(recipe)}
    assert names == {
        "top1_agreement",
        "top1_agreement_adversarial",
        "slowdown",
        "clean_drop",
        "attack_drop",
        "corruption_drop",
    }


def _engine(precision: str, agreement: float) -> Evaluation:
    return Evaluation(
        model="pruned",
        runtime="tensorrt",
        precision=precision,
        nonfinite_logits=0,
        parity=Parity(top1_agreement=agreement, max_abs_diff=0.01, compared=100),
    )


def _parity_gate(report: Report) -> Any:
    return {g.name: g for g in intrinsic_gates(report)}["engine-parity"]


def test_fp16_engines_are_held_to_their_agreement_with_pytorch() -> None:
    assert _parity_gate(Report(evaluations=[_engine("fp16", FP16_MIN_AGREEMENT)])).passed
    gate = _parity_gate(Report(evaluations=[_engine("fp16", 0.98)]))
    assert not gate.passed and "pruned/tensorrt/fp16: top-1 agreement 0.9800 (needs 0.99)" in gate.detail
    # INT8 engines are judged against their FP32 file by quantize.gate, not against PyTorch here.
    assert _parity_gate(Report(evaluations=[_engine("fp32", 1.0), _engine("int8", 0.9)])).passed


def test_an_export_beyond_its_parity_tolerance_fails() -> None:
    close = ExportParity(top1_agreement=1.0, max_abs_diff=2e-4, samples=64, within_atol=True)
    assert _parity_gate(Report(parity={"pruned": close})).passed
    far = ExportParity(top1_agreement=1.0, max_abs_diff=5e-2, samples=64, within_atol=False)
    gate = _parity_gate(Report(parity={"pruned": far}))
    assert (
        not gate.passed and "export pruned: max |dlogit| 5.00e-02 is beyond export.parity_atol" in gate.detail
    )


def test_without_a_bench_stage_the_slowdown_comes_from_the_quantize_stage(tmp_path: Any) -> None:
    import json

    from toolchain.report.quantization import quantization_section
    from toolchain.report.schema import QuantizedFile
    from toolchain.rundir import QUANTIZE, RunLayout

    layout = RunLayout(tmp_path)
    record = QuantizedFile(
        model="pruned",
        target="onnxruntime",
        scheme="u8s8",
        calibration="clean",
        file="pruned.int8-u8s8-clean.onnx",
        speed={"batches": {"1": {"speedup": 0.5}, "32": {"speedup": 2.0}}, "faster": False},
    )
    layout.record_path(QUANTIZE).parent.mkdir(parents=True)
    layout.record_path(QUANTIZE).write_text(json.dumps({"result": {"files": [record.to_json()]}}))
    (entry,) = quantization_section(layout, [], [])
    assert entry["vs_fp32"]["speedup"] == {"1": 0.5, "32": 2.0} and entry["vs_fp32"]["slowdown"] == 2.0
    # The bench stage's rows, when there are some, are what the gate judges.
    rows = [
        {"model": "pruned", "runtime": "onnxruntime", "precision": p, "batch": 1, "p50_ms": ms, **extra}
        for p, ms, extra in (("fp32", 1.0, {}), ("int8", 0.5, {"calibration": "clean"}))
    ]
    (entry,) = quantization_section(layout, [], rows)
    assert entry["vs_fp32"]["speedup"] == {"1": 2.0} and entry["vs_fp32"]["slowdown"] == 0.5
