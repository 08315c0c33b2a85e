"""bench/bench_int8_goals.py's verdicts: each goal met or missed from a report's ``vs_fp32``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def goals() -> ModuleType:
    return _load("bench_int8_goals")


VS_FP32 = {
    "top1_agreement": 0.992,  # >= 0.99: met
    "top1_agreement_adversarial": 0.96,  # < 0.97: missed
    "clean_drop": 0.005,  # == 0.005: met (the limit is inclusive)
    "attack_drop": -0.02,  # INT8 better than FP32: met
    "corruption_drop": None,  # not measured: missed
    "speedup": {"1": 3.0, "32": 2.4},
}


def test_each_goal_is_met_or_missed_from_the_measured_value(goals: ModuleType) -> None:
    verdict = goals.judge(VS_FP32, tuple(goals.GOALS), speed_goal=True)
    assert {k: v["met"] for k, v in verdict.items()} == {
        "top1_agreement": True,
        "top1_agreement_adversarial": False,
        "clean_drop": True,
        "attack_drop": True,
        "corruption_drop": False,
        "speedup_b32": False,  # 2.4x at batch 32 against 2.5x; batch 1's 3.0x does not count
    }
    assert verdict["top1_agreement_adversarial"] == {
        "op": ">=",
        "threshold": 0.97,
        "value": 0.96,
        "met": False,
    }


def test_only_the_goals_of_the_case_are_judged(goals: ModuleType) -> None:
    verdict = goals.judge(VS_FP32, ("top1_agreement",), speed_goal=False)
    assert list(verdict) == ["top1_agreement"] and verdict["top1_agreement"]["met"]
    assert goals.judge({"speedup": {}}, (), speed_goal=True)["speedup_b32"]["met"] is False


def test_a_missed_goal_is_marked_in_the_table(goals: ModuleType) -> None:
    renderers = importlib.import_module("renderers_perf")  # bench/ is on the path once goals loaded
    row = {**VS_FP32, "goals": goals.judge(VS_FP32, tuple(goals.GOALS), speed_goal=True)}
    assert renderers._goal_cell(row, "top1_agreement", renderers.pct) == "99.2%"
    assert renderers._goal_cell(row, "top1_agreement_adversarial", renderers.pct) == "**96.0% missed**"
    assert renderers._goal_cell(row, "corruption_drop", renderers.pts) == "–"
