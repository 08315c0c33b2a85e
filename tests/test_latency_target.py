"""Latency as a pruning budget: the search on a known latency curve, the recipe, a real run."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import pytest
from torch import nn

from tests.conftest import TINY_RECIPE
from toolchain.pruning.budget import BudgetError
from toolchain.pruning.latency_target import LatencySearch, Probe, search_macs_reduction
from toolchain.recipe import recipe_from_dict
from toolchain.recipe_prune import LatencyProbe, PruneTarget

REPO = Path(__file__).resolve().parents[1]


class CurveMeter:
    """A meter whose candidates are ``macs_reduction ** exponent`` times faster, exactly."""

    def __init__(self, exponent: float, dense_ms: float = 10.0) -> None:
        self.exponent, self.dense_ms = exponent, dense_ms
        self.probe = LatencyProbe()
        self.measured: list[float] = []

    def measure(self, model: nn.Module, macs_reduction: float) -> Probe:
        self.measured.append(macs_reduction)
        return Probe(macs_reduction, self.dense_ms, self.dense_ms / macs_reduction**self.exponent)


def _candidate(reachable: float = math.inf) -> Any:
    def prune(reduction: float) -> tuple[nn.Module, float]:
        if reduction > reachable:
            raise BudgetError(f"{reduction:.2f}x is not reachable")
        return nn.Identity(), reduction

    return prune


@pytest.mark.parametrize("exponent", [0.6, 1.0, 1.4])
def test_search_finds_the_macs_reduction_the_latency_curve_needs(exponent: float) -> None:
    meter = CurveMeter(exponent)
    search = search_macs_reduction(3.0, 0.05, _candidate(), meter, max_probes=6)  # type: ignore[arg-type]
    needed = 3.0 ** (1 / exponent)
    # The chosen reduction meets the target and is not much more pruning than needed.
    assert search.macs_reduction**exponent >= 3.0 * 0.95
    assert search.macs_reduction <= needed * 1.05 ** (1 / exponent) + 1e-9
    assert len(search.probes) <= 6 and meter.measured[0] == pytest.approx(3.0)
    # On a power law the log-log secant is exact after two probes.
    assert len(search.probes) <= 3


def test_prediction_interpolates_the_measured_curve_in_log_space() -> None:
    search = LatencySearch(
        target=2.0, macs_reduction=4.0, probes=[Probe(4.0, 8.0, 4.0), Probe(16.0, 8.0, 1.0)]
    )
    assert search.predict(1.0) == pytest.approx(1.0)
    assert search.predict(4.0) == pytest.approx(2.0)
    assert search.predict(8.0) == pytest.approx(2.0 * 2**1.0)  # slope 1 between 4x and 16x
    assert search.predict(2.0) == pytest.approx(2.0**0.5)  # slope 0.5 between 1x and 4x
    assert search.predict(32.0) == pytest.approx(16.0)  # the last segment, extended


def test_unreachable_latency_target_names_the_best_measurement() -> None:
    meter = CurveMeter(0.5)
    with pytest.raises(BudgetError, match=r"latency_reduction 4 was not reached.*best candidate measured"):
        search_macs_reduction(4.0, 0.05, _candidate(reachable=6.0), meter, max_probes=6)  # type: ignore[arg-type]
    # The search backed off from the unreachable reductions instead of stopping at the first.
    assert meter.measured and max(meter.measured) <= 6.0


def test_a_latency_target_is_one_of_the_three_budgets() -> None:
    target = PruneTarget(latency_reduction=3.0, latency={"batch": 32})
    assert target.metric == "latency" and target.as_dict() == {"latency_reduction": 3.0}
    assert target.latency.batch == 32 and target.latency.runtime == "onnxruntime"
    with pytest.raises(ValueError, match="exactly one"):
        PruneTarget(latency_reduction=3.0, macs_reduction=2.0)
    with pytest.raises(ValueError, match="configures a latency_reduction target"):
        PruneTarget(macs_reduction=2.0, latency={"batch": 32})
    with pytest.raises(ValueError, match="extra"):
        PruneTarget(latency_reduction=3.0, latency={"runtme": "torch"})
    # The probe's defaults written out (as a run's recipe.yaml holds them) configure nothing.
    written = PruneTarget(macs_reduction=2.0).model_dump(mode="json")
    assert PruneTarget(**written).as_dict() == {"macs_reduction": 2.0}


@pytest.mark.parametrize(
    "source", ["defaults", *sorted(p.name for p in (REPO / "deploy_examples").glob("*.yaml"))]
)
def test_a_runs_recipe_file_loads_back_as_the_same_recipe(source: str, tmp_path: Path) -> None:
    from toolchain.recipe import load_recipe, recipe_from_dict
    from toolchain.rundir import RunDir

    recipe = (
        recipe_from_dict({"prune": {"target": {"macs_reduction": 3.0}}})
        if source == "defaults"
        else load_recipe(REPO / "deploy_examples" / source)
    )
    with RunDir.open(tmp_path / "run", recipe.model_dump(mode="json")) as run:
        assert load_recipe(run.recipe_file).sha256() == recipe.sha256()


def _weights_in(runner: Any) -> int:
    import onnx

    return sum(math.prod(t.dims) for t in onnx.load(str(runner.path)).graph.initializer)


def _clock_by_weights(runners: dict[str, Any], *, batch: int, iterations: int) -> dict[str, dict[str, float]]:
    """A stand-in for ``compare_latency``: each file "runs" in a time set by its weight count.

    The stage still exports and opens every candidate; only the clock is replaced, so what the
    test checks does not depend on how busy the machine is (a real timing of a model this small
    swings by more than the target's margin).
    """
    dense = _weights_in(runners["dense"])
    return {k: {"p50_ms": 10.0 * (_weights_in(r) / dense) ** 0.7} for k, r in runners.items()}


@pytest.mark.e2e
def test_pipeline_prunes_to_a_measured_latency_reduction(
    tiny_run: tuple[Path, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The prune stage searches, prunes and times again; the report carries both figures."""
    from toolchain.pipeline import run_pipeline
    from toolchain.pruning import latency_target

    monkeypatch.setattr(latency_target, "compare_latency", _clock_by_weights)

    out = tmp_path / "run"
    out.mkdir()
    shutil.copy2(tiny_run[0] / "run.json", out / "run.json")
    shutil.copytree(tiny_run[0] / "train", out / "train")  # the same dense model, not retrained
    recipe = dict(TINY_RECIPE)
    recipe["prune"] = {
        **TINY_RECIPE["prune"],
        "target": {"latency_reduction": 1.3, "latency": {"batch": 32, "iterations": 20, "max_probes": 4}},
        "tolerance": 0.1,
    }
    recipe["gates"] = []
    report = run_pipeline(recipe_from_dict(recipe), out, progress=False).to_json()
    pruned = report["models"]["pruned"]
    latency = pruned["latency"]
    assert pruned["target"] == {"latency_reduction": 1.3}
    assert latency["runtime"] == "onnxruntime" and latency["batch"] == 32
    assert latency["measured_reduction"] == pytest.approx(latency["dense_ms"] / latency["pruned_ms"])
    probes = latency["search"]["probes"]
    assert 1 <= len(probes) <= 4
    # The method was handed the MACs reduction of the smallest candidate that met the target.
    met = [p for p in probes if p["latency_reduction"] >= 1.3 * 0.9]
    assert latency["search"]["macs_reduction"] == pytest.approx(min(p["macs_reduction"] for p in met))
    assert pruned["macs_reduction"] >= latency["search"]["macs_reduction"] * 0.9
    # The prediction lies on the measured curve (not a timing: the curve is whatever was measured).
    curve = LatencySearch(
        1.3, latency["search"]["macs_reduction"], [Probe(**p) for p in _probe_fields(probes)]
    )
    assert latency["predicted_reduction"] == pytest.approx(curve.predict(pruned["macs_reduction"]), rel=1e-3)
    assert pruned["target_met"] == (latency["measured_reduction"] >= 1.3 * 0.9)
    assert pruned["target_met"], "the weight clock is smooth in the pruning, so the target is reachable"
    (gate,) = [g for g in report["intrinsic_gates"] if g["name"] == "budget-met"]
    assert gate["passed"] == pruned["target_met"] and "latency_reduction" in gate["detail"]


def test_a_written_target_replaces_the_default_instead_of_merging_with_it() -> None:
    """The default budget is 4x MACs; a recipe asking for params or latency gets only that."""
    for target in ({"params_reduction": 2.0}, {"latency_reduction": 2.0}):
        recipe = recipe_from_dict({**TINY_RECIPE, "prune": {**TINY_RECIPE["prune"], "target": target}})
        assert recipe.prune.target.as_dict() == target


def _probe_fields(probes: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: p[k] for k in ("macs_reduction", "dense_ms", "model_ms")} for p in probes]
