"""``robustprune select``: every candidate recorded, the best chosen on held-out images only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from toolchain import selection
from toolchain.cli import main
from toolchain.data import load_data
from toolchain.errors import UserError
from toolchain.recipe import recipe_from_dict

pytestmark = pytest.mark.usefixtures("one_thread")

ATTACK = {"eps": "4/255", "step_size": "2/255", "steps": 1}
RECIPE: dict[str, Any] = {
    "name": "select-tiny",
    "device": "cpu",
    "data": {"dataset": "signs", "image_size": 16, "train_samples": 192, "holdout": 48, "batch_size": 32},
    "model": {"arch": "convnet", "width": 0.5},
    "train": {"epochs": 2, "lr": 0.1, "loss": "pgd", "attack": ATTACK},
    "prune": {"steps": 1, "criterion": "magnitude", "target": {"macs_reduction": 2.0}},
    "finetune": {"epochs": 1, "attack": ATTACK},
    "validate": {"samples": 48, "batch_size": 48, "attacks": [{"name": "pgd", "eps": "4/255", "steps": 2}]},
}


def test_best_is_the_most_robust_candidate_that_met_the_budget() -> None:
    rows = [
        {"method": "a", "loss": "pgd", "target_met": True, "robust": 0.5, "clean": 0.9},
        {"method": "b", "loss": "ard", "target_met": False, "robust": 0.9, "clean": 0.9},
        {"method": "c", "loss": "rslad", "target_met": True, "robust": 0.6, "clean": 0.7},
        {"method": "d", "loss": "pgd", "target_met": True, "robust": 0.6, "clean": 0.8},
    ]
    chosen = selection.best(rows)
    assert chosen == {"method": "d", "loss": "pgd", "set": ["prune.method=d", "finetune.loss=pgd"]}
    assert selection.best(rows[1:2]) is None


def test_select_records_every_candidate_and_scores_only_held_out_images(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scored: list[torch.Tensor] = []
    real = selection._score

    def spy(recipe, model, data):  # type: ignore[no-untyped-def]
        scored.append(data.val.images)
        return real(recipe, model, data)

    monkeypatch.setattr(selection, "_score", spy)
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(json.dumps(RECIPE))
    out = tmp_path / "select.json"
    code = main(["select", str(recipe_file), "--losses", "pgd", "ard", "--out", str(out), "--no-progress"])
    assert code == 0
    record = json.loads(out.read_text())
    assert [(c["method"], c["loss"]) for c in record["candidates"]] == [
        ("iterative", "pgd"),
        ("iterative", "ard"),
    ]
    assert all(c["target_met"] and 0 <= c["robust"] <= c["clean"] <= 1 for c in record["candidates"])
    top = max(record["candidates"], key=lambda c: (c["robust"], c["clean"]))
    assert record["chosen"]["loss"] == top["loss"] and record["holdout"] == 48
    assert "chosen: --set prune.method=iterative" in capsys.readouterr().out
    # dense + 2 candidates, each on the 48 images held out from the training split, not on the test split
    holdout = load_data("signs", image_size=16, train_samples=192, holdout=48, seed=0).val
    test = load_data("signs", image_size=16, val_samples=48, seed=0).val
    assert len(scored) == 3 and all(torch.equal(s, holdout.images) for s in scored)  # type: ignore[attr-defined]
    assert not torch.equal(holdout.images, test.images)  # type: ignore[attr-defined]


def test_select_refuses_a_recipe_without_holdout_before_training(tmp_path: Path) -> None:
    raw = {**RECIPE, "data": {k: v for k, v in RECIPE["data"].items() if k != "holdout"}}
    with pytest.raises(UserError, match=r"set data\.holdout"):
        selection.select(recipe_from_dict(raw))
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(json.dumps(RECIPE))
    assert main(["select", str(recipe_file), "--methods", "hydr"]) == 2  # unknown method: before training
