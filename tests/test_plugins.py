"""A pruning method with its own settings and a runtime are each one class plus one registry line.

The test module itself plays the plugin author: it registers a toy method (with a settings
section the recipe writes as ``prune.every-other``) and a toy runtime, and runs them through the
CLI on a tiny recipe. Nothing else in the project is told about them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import Field
from torch import nn

from exporters.ort_runner import OnnxRuntimeRunner
from exporters.runtime_spec import RUNTIMES, RuntimeSpec
from toolchain.cli import main
from toolchain.pruning.methods import METHODS, PruneJob, PruneOutcome, PruningMethod
from toolchain.pruning.prune import prune_to_target
from toolchain.recipe_prune import MethodSection

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("one_thread")]


class ToySettings(MethodSection):
    """The toy method's own section of the recipe."""

    note: str = Field("none", description="a label the method copies into its report info")


class ToyMethod(PruningMethod):
    """One magnitude step to the budget; records its own setting."""

    name = "toy"
    settings = ToySettings

    def run(self, model: nn.Module, job: PruneJob) -> PruneOutcome:
        result = prune_to_target(
            model,
            example_inputs=job.example_inputs,
            criterion="magnitude",
            macs_reduction=job.budget.reduction,
            tolerance=job.budget.tolerance,
            ignored_layers=job.ignored_layers,
            progress=False,
        )
        return PruneOutcome(result.model, result.history, info={"note": self.own.note})


def _toy_runner(path: str, *, threads: int = 1, spinning: bool = False) -> OnnxRuntimeRunner:
    return OnnxRuntimeRunner(path, threads=threads, spinning=spinning, runtime="toy-ort")


@pytest.fixture
def plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    """Register the toy plugins for one test only (the one registry line each, undone after)."""
    monkeypatch.setitem(METHODS._items, "toy", ToyMethod)
    monkeypatch.setitem(RUNTIMES._items, "toy-ort", RuntimeSpec("toy-ort", _toy_runner, "onnx"))


def _recipe(**changes: Any) -> dict[str, Any]:
    recipe: dict[str, Any] = {
        "version": 1,
        "name": "plugins",
        "data": {
            "dataset": "signs",
            "image_size": 16,
            "train_samples": 48,
            "val_samples": 8,
            "batch_size": 16,
        },
        "model": {"arch": "convnet", "width": 0.5},
        "train": {"epochs": 1, "loss": "clean"},
        "prune": {"method": "toy", "target": {"macs_reduction": 1.5}, "toy": {"note": "from the recipe"}},
        "finetune": {"epochs": 1, "loss": "clean"},
        "export": {"parity_samples": 8},
        "validate": {
            "samples": 8,
            "batch_size": 8,
            "runtimes": ["torch", "onnxruntime", "toy-ort"],
            "attacks": [{"name": "pgd", "eps": "2/255", "steps": 1}],
            "corruptions": {"names": []},
        },
        "bench": {"enabled": False},
        # A run with no gate does not pass (the intrinsic evaluated-and-gated gate).
        "gates": [{"metric": "models.pruned.macs_reduction", "threshold": 1.0}],
    }
    recipe.update(changes)
    return recipe


def test_a_method_with_settings_and_a_runtime_registered_by_a_plugin_run_through_the_cli(
    plugins: None, tmp_path: Path
) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(_recipe()))
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    pruned = report["models"]["pruned"]
    assert pruned["method"] == "toy" and pruned["info"] == {"note": "from the recipe"}
    assert pruned["target_met"] and pruned["macs_reduction"] >= 1.5 * 0.95
    toy = [e for e in report["evaluations"] if e["runtime"] == "toy-ort"]
    assert [e["model"] for e in toy] == ["dense", "pruned"]
    assert all(e["parity"]["top1_agreement"] == 1.0 for e in toy)
    assert all(a["mode"] == "transfer" for e in toy for a in e["attacks"])


def test_a_plugin_section_with_an_unknown_key_is_refused_in_one_line(
    plugins: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = _recipe(prune={"method": "toy", "target": {"macs_reduction": 1.5}, "toy": {"nope": 1}})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(bad))
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown key 'prune.toy.nope'" in err[0]
    assert not (tmp_path / "run").exists()


def test_without_the_plugin_its_names_are_unknown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(_recipe()))
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    assert "unknown pruning method 'toy'" in capsys.readouterr().err
