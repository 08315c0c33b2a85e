"""The quantize and engine stages inside the pipeline, resumed on the tiny run's directory so
training, pruning and export are not repeated (their keys do not depend on these sections)."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from exporters import tensorrt_runner as trt_runner_module
from exporters.tensorrt import TensorRTRunner
from tests.conftest import TINY_RECIPE
from tests.test_tensorrt import fake_tensorrt, install, named
from toolchain.cli import main
from toolchain.pipeline import run_pipeline
from toolchain.recipe import recipe_from_dict
from toolchain.rundir import RunLayout
from toolchain.stages import runners as stage_runners

pytestmark = pytest.mark.e2e

INT8 = {
    "enabled": True,
    "samples": 60,
    "attack": {"eps": "2/255", "steps": 1},
    "gate": {
        # A timing on a busy machine: the gate must exist and find its metric, not judge the tiny
        # model's speed (a batch-4 INT8 p50 15x FP32's was measured under load).
        "max_slowdown": 1000.0,
        "max_clean_drop": 0.5,
        "max_pgd_drop": 0.5,
        "max_corruption_drop": 0.5,
        # The tiny model's agreement is not the point here; the gates must still find the metric.
        "min_agreement": 0.0,
        "min_adversarial_agreement": 0.0,
    },
}


def _recipe(**sections: Any) -> dict[str, Any]:
    recipe = json.loads(json.dumps(TINY_RECIPE))
    recipe.update(json.loads(json.dumps(sections)))
    # With INT8 files there are several pruned ONNX Runtime evaluations: name the FP32 one.
    recipe["gates"][1]["metric"] = (
        "evaluations[model=pruned,runtime=onnxruntime,precision=fp32].parity.top1_agreement"
    )
    return recipe


def _mtimes(out: Path) -> dict[str, float]:
    return {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/stage.json")}


@pytest.fixture(scope="module")
def int8_run(
    tiny_run: tuple[Path, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("int8") / "run"
    shutil.copytree(tiny_run[0], out)
    before = _mtimes(out)
    recipe = _recipe(quantize=INT8, bench=dict(TINY_RECIPE["bench"], batch_sizes=[1, 4]))
    report = run_pipeline(recipe_from_dict(recipe), out, progress=False).to_json()
    after = _mtimes(out)
    assert all(after[s] == before[s] for s in ("train", "prune", "finetune", "export"))  # resumed
    return out, report


def test_quantize_writes_both_calibrations_and_every_conv_fuses(int8_run: tuple[Path, dict]) -> None:
    out, report = int8_run
    entries = {q["calibration"]: q for q in report["quantization"]}
    assert set(entries) == {"clean", "mixed"}
    assert entries["clean"]["counts"] == {"clean": 60, "corrupted": 0, "adversarial": 0}
    assert entries["mixed"]["counts"] == {"clean": 30, "corrupted": 15, "adversarial": 15}
    for q in entries.values():
        assert (q["target"], q["scheme"], q["model"]) == ("onnxruntime", "u8s8", "pruned")
        assert (out / "quantize" / q["file"]).is_file()
        # convnet: 4 convolutions, all run as integer kernels by ONNX Runtime.
        assert (
            q["fusion"]["conv_nodes"] == 4 and q["fusion"]["integer_conv"] == 4 and q["fusion"]["all_integer"]
        )


def test_int8_is_validated_beside_fp32_with_parity_and_drops(int8_run: tuple[Path, dict]) -> None:
    _, report = int8_run
    int8 = [e for e in report["evaluations"] if e["precision"] == "int8"]
    assert sorted(e["calibration"] for e in int8) == ["clean", "mixed"]
    fp32 = next(
        e
        for e in report["evaluations"]
        if (e["model"], e["runtime"], e["precision"]) == ("pruned", "onnxruntime", "fp32")
    )
    for ev in int8:
        assert ev["samples"] == 60 and ev["scheme"] == "u8s8"
        parity = ev["parity_fp32"]
        assert parity["clean"]["samples"] == 60 and parity["adversarial"]["samples"] == 60
        assert parity["corrupted"]["samples"] == 2 * 60  # two corruptions at one severity
        assert 0.5 <= parity["clean"]["top1_agreement"] <= 1.0
        entry = next(q for q in report["quantization"] if q["calibration"] == ev["calibration"])
        assert entry["vs_fp32"]["clean_drop"] == pytest.approx(fp32["clean_accuracy"] - ev["clean_accuracy"])
        assert entry["vs_fp32"]["top1_agreement"] == parity["clean"]["top1_agreement"]
        assert set(entry["vs_fp32"]["speedup"]) == {"1", "4"}
    gates = [g for g in report["gates"] if g["metric"].startswith("quantization[")]
    per_file = [
        "top1_agreement",
        "top1_agreement_adversarial",
        "slowdown",
        "clean_drop",
        "attack_drop",
        "corruption_drop",
    ]
    assert [g["metric"].rsplit(".", 1)[1] for g in gates] == per_file * 2  # every calibration set
    assert [g["metric"].split("calibration=")[1][:5] for g in gates] == ["clean"] * 6 + ["mixed"] * 6
    assert all(g["passed"] for g in report["gates"]), report["gates"]


def test_latency_rows_say_what_ran(int8_run: tuple[Path, dict]) -> None:
    _, report = int8_run
    rows = report["latency"]
    assert len(rows) == 2 * 4  # dense, pruned, pruned int8 x2; batch 1 and 4
    for row in rows:
        assert (row["runtime"], row["device"], row["provider"], row["threads"]) == (
            "onnxruntime",
            "cpu",
            "CPUExecutionProvider",
            2,
        )
    assert {r.get("calibration") for r in rows if r["precision"] == "int8"} == {"clean", "mixed"}
    assert report["environment"]["device"] == "cpu"


def test_int8_gate_refuses_a_slower_or_less_accurate_model(int8_run: tuple[Path, dict]) -> None:
    out, report = int8_run
    entry = next(q for q in report["quantization"] if q["calibration"] == "mixed")
    # A limit just below the measured value must fail: rebuild the report with tighter limits.
    from toolchain.report.assemble import assemble_report

    strict = dict(
        INT8,
        gate={
            "calibration": "mixed",
            "min_agreement": None,
            "min_adversarial_agreement": None,
            "max_slowdown": entry["vs_fp32"]["slowdown"] * 0.5,
            "max_clean_drop": None,
            "max_pgd_drop": None,
            "max_corruption_drop": None,
        },
    )
    tight = assemble_report(
        RunLayout(out), recipe_from_dict(_recipe(quantize=strict)), data_name="signs"
    ).to_json()
    (gate,) = [g for g in tight["gates"] if g["metric"].startswith("quantization[")]
    assert gate["metric"].endswith("vs_fp32.slowdown") and not gate["passed"] and not tight["passed"]


def test_torch_bench_gets_the_recipe_thread_count(
    tiny_run: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    shutil.copytree(tiny_run[0], out)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        recipe = _recipe(bench=dict(TINY_RECIPE["bench"], runtimes=["torch", "onnxruntime"], threads=2))
        report = run_pipeline(recipe_from_dict(recipe), out, progress=False).to_json()
        assert torch.get_num_threads() == 1  # restored after the bench stage
    finally:
        torch.set_num_threads(before)
    threads = {(r["model"], r["runtime"]): r["threads"] for r in report["latency"]}
    assert threads == {
        ("dense", "torch"): 2,
        ("pruned", "torch"): 2,
        ("dense", "onnxruntime"): 2,
        ("pruned", "onnxruntime"): 2,
    }


def test_engine_stage_builds_once_and_validation_never_builds(
    tiny_run: tuple[Path, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the fake TensorRT (host memory, a 16x16 'engine'), only the engine stage builds."""
    rec = install(monkeypatch, fake_tensorrt("10.3.0"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(trt_runner_module, "_require_cuda", lambda device: None)
    monkeypatch.setattr(TensorRTRunner, "_stream_handle", lambda self: 0)
    monkeypatch.setattr(stage_runners, "TensorRTRunner", functools.partial(TensorRTRunner, device="cpu"))
    out = tmp_path / "run"
    shutil.copytree(tiny_run[0], out)
    recipe = _recipe(
        quantize=dict(INT8, targets=["onnxruntime", "tensorrt"], gate=None),
        engine={"precisions": ["fp32", "fp16", "int8"], "min_batch": 2, "opt_batch": 2, "max_batch": 4},
        bench=dict(TINY_RECIPE["bench"], runtimes=["tensorrt"], batch_sizes=[2]),
    )
    report = run_pipeline(recipe_from_dict(recipe), out, progress=False).to_json()
    engines = {(e["model"], e["precision"], e["calibration"]) for e in report["engines"]}
    assert engines == {
        ("dense", "fp32", None),
        ("dense", "fp16", None),
        ("pruned", "fp32", None),
        ("pruned", "fp16", None),
        ("pruned", "int8", "clean"),
        ("pruned", "int8", "mixed"),
    }
    built = len(named(rec, "build_serialized_network"))
    assert built == 6  # one per engine; validate and bench only loaded them
    parsed = [c[1] for c in named(rec, "parse_from_file")]
    assert "pruned.int8-s8s8-mixed.onnx" in parsed  # INT8 from the symmetric Q/DQ file
    rows = {(r["model"], r["precision"], r.get("calibration")) for r in report["latency"]}
    assert rows == engines and all(
        r["runtime"] == "tensorrt" and r["threads"] is None for r in report["latency"]
    )
    run_pipeline(recipe_from_dict(recipe), out, progress=False)
    assert len(named(rec, "build_serialized_network")) == built  # resumed: nothing rebuilt


def test_tensorrt_in_bench_without_tensorrt_stops_before_writing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    import yaml

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    path = tmp_path / "r.yaml"
    path.write_text(
        yaml.safe_dump(_recipe(bench=dict(TINY_RECIPE["bench"], runtimes=["onnxruntime", "tensorrt"])))
    )
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out)]) == 2
    assert "bench.runtimes lists 'tensorrt' but TensorRT is not installed" in capsys.readouterr().err
    assert not out.exists()


def test_validate_command_on_an_int8_file_finds_its_pytorch_model(
    int8_run: tuple[Path, dict], tmp_path: Path
) -> None:
    from toolchain.validate_engine import validate_engine

    out, _ = int8_run
    engine = out / "quantize" / "pruned.int8-u8s8-mixed.onnx"
    report = validate_engine(engine, recipe_from_dict(_recipe()), tmp_path / "v", progress=False).to_json()
    (ev,) = report["evaluations"]
    assert (ev["runtime"], ev["precision"]) == ("onnxruntime", "int8")
    assert report["engine"]["pytorch_reference"] and report["engine"]["metadata"]["quant_scheme"] == "u8s8"
    assert next(a for a in ev["attacks"] if a["name"] == "pgd")["mode"] == "transfer"
