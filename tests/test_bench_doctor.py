"""``robustprune bench`` (the latency study, on a tiny model) and ``robustprune doctor``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import TINY_RECIPE
from toolchain import machine
from toolchain.cli import main
from toolchain.doctor import recipe_needs
from toolchain.errors import UserError
from toolchain.latency_study import LatencyStudy, run_latency_study, summarize
from toolchain.recipe import recipe_from_dict

pytestmark = pytest.mark.usefixtures("one_thread")

X86 = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_vnni fma\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd asimddp i8mm\n"
TINY_STUDY = {
    "arch": "convnet",
    "reductions": (2.0,),
    "int8_reductions": (2.0,),
    "int8_schemes": ("u8s8",),
    "batches": (1, 2),
    "threads": 1,
    "round_to": None,
    "iterations": 10,
    "min_iterations": 10,
    "warmup": 1,
    "rounds": 2,
}


def test_cpu_flags_and_int8_support() -> None:
    flags = machine.cpu_flags(X86)
    assert {"avx512f", "avx512_vnni"} <= flags
    x86 = machine.cpu_int8_support(flags)
    assert (x86["vnni"], x86["nchwc_block"], x86["int8_instructions"]) == (True, 16, ["avx512_vnni"])
    arm = machine.cpu_int8_support(machine.cpu_flags(ARM))
    assert (arm["vnni"], arm["nchwc_block"], arm["int8_instructions"]) == (False, None, ["asimddp", "i8mm"])
    assert machine.cpu_int8_support(machine.cpu_flags("flags : sse avx2"))["nchwc_block"] == 8


def test_other_load_share_is_others_cpu_over_capacity(monkeypatch: pytest.MonkeyPatch) -> None:
    samples = iter([(10.0, 2.0, 0.0), (11.2, 2.2, 1.0)])  # busy +1.2 s, ours +0.2 s, in 1 s wall
    monkeypatch.setattr(machine.OtherLoad, "_sample", staticmethod(lambda: next(samples)))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert machine.OtherLoad().share() == pytest.approx(0.5)


def test_latency_study_times_every_model_interleaved_and_restores_the_process() -> None:
    affinity = os.sched_getaffinity(0)
    result = run_latency_study(LatencyStudy(**TINY_STUDY))
    assert os.sched_getaffinity(0) == affinity  # pinned for the measurement only
    models = {m["model"]: m for m in result["models"]}
    assert list(models) == ["dense", "pruned-2x", "pruned-2x-int8-u8s8"]
    assert models["pruned-2x"]["macs_reduction"] == pytest.approx(2.0, rel=0.1)
    fusion = models["pruned-2x-int8-u8s8"]["fusion"]
    assert fusion["conv_nodes"] == 4 and fusion["integer_conv"] == 4
    rows = result["rows"]
    assert [(r["model"], r["batch"]) for r in rows] == [(m, b) for b in (1, 2) for m in models]
    for row in rows:
        assert row["samples"] == 10 and row["p50_ms"] <= row["p99_ms"] <= row["max_ms"]
        assert (row["runtime"], row["device"], row["provider"]) == (
            "onnxruntime",
            "cpu",
            "CPUExecutionProvider",
        )
        dense = next(r for r in rows if r["model"] == "dense" and r["batch"] == row["batch"])
        assert row["speedup_vs_dense"] == pytest.approx(dense["p50_ms"] / row["p50_ms"])
    env = result["environment"]
    assert env["intra_op_threads"] == 1 and len(env["cpu_affinity"]) == 1 and env["torch_threads"] == 1
    summary = result["summary"]
    assert set(summary["fp32_efficiency"]) == {"pruned-2x@1", "pruned-2x@2"}
    assert summary["fastest_scheme"] == "u8s8" and set(summary["end_to_end"]) == {
        "pruned-2x-int8-u8s8@1",
        "pruned-2x-int8-u8s8@2",
    }


def test_summary_reads_the_targets_off_the_rows() -> None:
    rows = [
        {
            "model": "dense",
            "batch": 32,
            "precision": "fp32",
            "p50_ms": 40.0,
            "speedup_vs_dense": 1.0,
            "macs_reduction": 1.0,
        },
        {
            "model": "p4",
            "batch": 32,
            "precision": "fp32",
            "p50_ms": 10.0,
            "speedup_vs_dense": 4.0,
            "macs_reduction": 4.0,
        },
        {
            "model": "q",
            "batch": 32,
            "precision": "int8",
            "scheme": "u8s8",
            "p50_ms": 4.0,
            "speedup_vs_dense": 10.0,
            "speedup_vs_fp32": 2.5,
            "macs_reduction": 4.0,
        },
        {
            "model": "r",
            "batch": 32,
            "precision": "int8",
            "scheme": "s8s8",
            "p50_ms": 12.0,
            "speedup_vs_dense": 3.3,
            "speedup_vs_fp32": 0.83,
            "macs_reduction": 4.0,
        },
    ]
    summary = summarize(
        rows, [{"model": "q", "fusion": {"integer_conv": 1}}, {"model": "p4", "fusion": None}]
    )
    assert summary["fp32_efficiency"] == {"p4@32": 1.0}
    assert summary["int8_vs_fp32"] == {"q@32": 2.5, "r@32": 0.83}
    assert summary["fastest_scheme"] == "u8s8" and summary["fused"] == {"q": {"integer_conv": 1}}


def test_study_settings_are_checked() -> None:
    with pytest.raises(UserError, match="not among the pruned"):
        LatencyStudy(reductions=(2.0,), int8_reductions=(4.0,)).check()
    with pytest.raises(UserError, match="magnitude or random"):
        LatencyStudy(criterion="taylor").check()


def test_bench_command_writes_json_and_prints_the_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "latency.json"
    args = [
        "bench",
        "--arch",
        "convnet",
        "--reductions",
        "2",
        "--int8",
        "",
        "--batches",
        "1",
        "--threads",
        "1",
    ]
    args += ["--round-to", "none", "--iterations", "5", "--min-iterations", "5", "--out", str(out)]
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert [r["model"] for r in result["rows"]] == ["dense", "pruned-2x"]
    assert "| pruned-2x | fp32 |" in capsys.readouterr().out
    assert main(["bench", "--reductions", "two"]) == 2


def _machine(vnni: bool = True, block: int | None = 16) -> dict[str, Any]:
    return {
        "cuda_available": False,
        "gpus": [],
        "cpu": {"vnni": vnni, "int8_instructions": ["avx512_vnni"] if vnni else [], "nchwc_block": block},
    }


def test_recipe_needs_name_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    raw = json.loads(json.dumps(TINY_RECIPE))
    raw["validate"]["runtimes"] = ["onnxruntime", "tensorrt"]
    raw["quantize"] = {"enabled": True}
    raw["prune"]["round_to"] = 4
    raw["device"] = "cuda:0"
    needs = {n["need"]: n for n in recipe_needs(recipe_from_dict(raw), _machine(vnni=False))}
    assert not needs["device: cuda:0"]["ok"] and needs["device: cuda:0"]["required"]
    assert not needs["validate: runtime tensorrt"]["ok"] and needs["validate: runtime tensorrt"]["required"]
    assert needs["validate: runtime onnxruntime"]["ok"]
    assert not any(n.startswith("engine") for n in needs)  # the runtime lists say it once
    int8 = needs["quantize: fast CPU INT8 (VNNI)"]
    assert not int8["ok"] and not int8["required"] and "slower than FP32" in int8["detail"]
    rounding = needs["prune.round_to a multiple of 16 (ONNX Runtime CPU NCHWc block)"]
    assert not rounding["ok"] and "round_to is 4" in rounding["detail"]


def test_doctor_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    assert main(["doctor"]) == 0
    text = capsys.readouterr().out
    assert "onnxruntime" in text and "CPU INT8" in text and "TensorRT" in text
    assert main(["doctor", "--json"]) == 0
    probe = json.loads(capsys.readouterr().out)["machine"]
    assert "CPUExecutionProvider" in probe["onnxruntime_providers"]
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    raw = json.loads(json.dumps(TINY_RECIPE))
    raw["bench"]["runtimes"] = ["tensorrt"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["doctor", "--recipe", str(recipe)]) == 1
    assert "[MISS] bench: runtime tensorrt: TensorRT is not installed" in capsys.readouterr().out
