"""Detection through the CLI, end to end: a tiny detnet run on driving-scenes boxes reports mAP,
mPC/rPC, attack mAP and the vanishing rate on PyTorch and ONNX Runtime, passes its gates, and
its ONNX file validates on its own; a user's detection factory goes through too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from toolchain.cli import main
from toolchain.data.boxes import DETECTION_CLASSES

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("one_thread")]

TINY = {
    "version": 1,
    "name": "det-tiny",
    "task": "detection",
    "seed": 0,
    "data": {
        "dataset": "driving-scenes",
        "image_size": 128,  # 128 x 64
        "train_samples": 16,
        "val_samples": 6,
        "batch_size": 8,
    },
    "model": {"arch": "detnet", "width": 0.25},
    "train": {"epochs": 1, "loss": "pgd", "attack": {"eps": "2/255", "step_size": "2/255", "steps": 1}},
    "prune": {
        "steps": 1,
        "importance_batches": 1,
        "target": {"macs_reduction": 2.0},
        "finetune_between": {"epochs": 0},
        "bn_recalibration_batches": 1,
    },
    "finetune": {"epochs": 1, "loss": "hybrid", "attack": {"eps": "2/255", "step_size": "2/255", "steps": 1}},
    "export": {"parity_samples": 6},
    "validate": {
        "samples": 6,
        "batch_size": 3,
        "attacks": [
            {"name": "pgd", "eps": "2/255", "steps": 2},
            {"name": "tog-vanishing", "eps": "8/255", "steps": 2},
        ],
        "corruptions": {"names": ["fog"], "severities": [1, 3]},
    },
    "bench": {"warmup": 1, "iterations": 2},
    "gates": [
        {"metric": "evaluations[model=pruned,runtime=onnxruntime].parity.top1_agreement", "threshold": 1.0},
        {"metric": "evaluations[model=pruned,runtime=onnxruntime].map50", "op": ">=", "threshold": 0.0},
    ],
}


def _run(tmp_path: Path, recipe: dict, *extra: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code = main(["run", str(path), "--out", str(tmp_path / "run"), "--no-progress", *extra])
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    return code, report


def test_a_detection_run_reports_detection_scores_and_its_engine_validates(tmp_path: Path) -> None:
    code, report = _run(tmp_path, TINY)
    assert code == 0 and report["passed"] and report["status"] == "completed"
    assert report["models"]["pruned"]["target_met"]
    evs = {(e["model"], e["runtime"]): e for e in report["evaluations"]}
    assert set(evs) == {(m, r) for m in ("dense", "pruned") for r in ("torch", "onnxruntime")}
    ort, pt = evs[("pruned", "onnxruntime")], evs[("pruned", "torch")]
    assert ort["task"] == "detection" and set(ort["per_class_ap"]) == set(DETECTION_CLASSES)
    assert abs(ort["map"] - pt["map"]) <= 1e-3  # the same detections on both runtimes
    assert ort["corruptions"]["mpc"] is not None
    assert set(ort["corruptions"]["per_corruption_map"]["fog"]) == {"1", "3"}
    assert [(a["name"], a["mode"]) for a in ort["attacks"]] == [
        ("pgd", "transfer"),
        ("tog-vanishing", "transfer"),
    ]
    assert all(0.0 <= a["vanishing_rate"] <= 1.0 for a in ort["attacks"])
    latency = [r for r in report["latency"] if r["model"] == "pruned"]
    assert latency and all(r["postprocess_p50_ms"] is not None for r in latency)
    onnx = tmp_path / "run" / "export" / "pruned.onnx"
    code = main(
        [
            "validate",
            "--engine",
            str(onnx),
            "--recipe",
            str(tmp_path / "recipe.yaml"),
            "--out",
            str(tmp_path / "engine"),
            "--no-progress",
        ]
    )
    assert code == 0
    engine = json.loads((tmp_path / "engine" / "report.json").read_text())
    (row,) = engine["evaluations"]
    assert row["map"] == pytest.approx(ort["map"], abs=1e-3)
    assert [a["mode"] for a in row["attacks"]] == ["transfer", "transfer"]


def test_a_user_detection_factory_goes_through(tmp_path: Path) -> None:
    recipe = {
        **TINY,
        "model": {"arch": "tests.user_models:make_detector"},
        "validate": {**TINY["validate"], "attacks": [{"name": "pgd", "eps": "2/255", "steps": 1}]},
    }
    code, report = _run(tmp_path, recipe)
    assert code == 0, report.get("error")
    pruned = report["models"]["pruned"]
    assert pruned["target_met"] and pruned["macs_reduction"] >= 1.9
    ort = next(e for e in report["evaluations"] if (e["model"], e["runtime"]) == ("pruned", "onnxruntime"))
    assert ort["parity"]["top1_agreement"] == 1.0


def test_the_detection_quickstart_passes_preflight() -> None:
    from toolchain.preflight import check
    from toolchain.recipe import load_recipe

    recipe = load_recipe(
        Path(__file__).resolve().parents[1] / "deploy_examples" / "detection_quickstart.yaml"
    )
    # Names, attacks, corruptions, the data's boxes and the model's raw heads, on few scenes.
    data = check(
        recipe.model_copy(
            update={"data": recipe.data.model_copy(update={"train_samples": 4, "val_samples": 2})}
        )
    )
    assert recipe.task == "detection" and data.task == "detection" and data.input_hw == (128, 256)
