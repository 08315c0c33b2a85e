"""The whole pipeline with tiny settings: numbers from report.json, resume, and re-run scope."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import TINY_RECIPE
from toolchain.pipeline import run_pipeline
from toolchain.recipe import recipe_from_dict
from toolchain.report.schema import Report
from toolchain.rundir import sha256_file

pytestmark = pytest.mark.e2e


def _eval(report: dict[str, Any], model: str, runtime: str) -> dict[str, Any]:
    (match,) = [e for e in report["evaluations"] if e["model"] == model and e["runtime"] == runtime]
    return match


def test_report_skeleton_and_numbers(tiny_run: tuple[Path, Report]) -> None:
    out, typed = tiny_run
    report = json.loads((out / "report.json").read_text())
    assert report == typed.to_json()
    assert report["schema"] == "robustprune.report/1"
    assert report["status"] == "completed"
    assert len(report["recipe_sha256"]) == 64
    assert report["environment"]["onnxruntime"] and report["environment"]["threads"] == 2

    pruned = report["models"]["pruned"]
    assert pruned["macs_reduction"] == pytest.approx(2.0, rel=0.05)
    assert pruned["target"] == {"macs_reduction": 2.0} and len(pruned["steps"]) == 2
    assert pruned["target_met"] is True and pruned["tolerance"] == 0.05
    # Channels per layer, counted on the saved models: pruning removed some in each conv.
    dense_channels = report["models"]["dense"]["channels"]
    assert set(pruned["channels"]) == set(dense_channels)
    assert sum(pruned["channels"].values()) < sum(dense_channels.values())
    assert pruned["macs"] < report["models"]["dense"]["macs"]
    assert pruned["params"] < report["models"]["dense"]["params"]

    assert {(e["model"], e["runtime"]) for e in report["evaluations"]} == {
        ("dense", "torch"),
        ("dense", "onnxruntime"),
        ("pruned", "torch"),
        ("pruned", "onnxruntime"),
    }
    for ev in report["evaluations"]:
        assert ev["samples"] == 60
        assert ev["clean_accuracy"] > 0.25, ev  # 12 classes: chance is 0.083
        assert set(ev["corruptions"]["per_corruption"]) == {"gaussian_noise", "fog"}
        assert 0.0 <= ev["corruptions"]["mean_accuracy"] <= 1.0
        pgd = next(a for a in ev["attacks"] if a["name"] == "pgd")
        assert pgd["accuracy"] <= ev["clean_accuracy"]
        square = next(a for a in ev["attacks"] if a["name"] == "square")
        assert square["mode"] == "black-box" and 0 < square["queries"] <= 10 and square["samples"] == 20
        (robust,) = ev["robust_accuracy"]  # one budget: 4/255 L-inf
        assert robust["attacks"] == ["pgd", "square"] and robust["samples"] == 20
        assert robust["accuracy"] <= square["accuracy"]  # the same 20 images: never above either
        assert ev["nonfinite_logits"] == 0

    ort = _eval(report, "pruned", "onnxruntime")
    assert next(a for a in ort["attacks"] if a["name"] == "pgd")["mode"] == "transfer"
    assert (
        next(a for a in _eval(report, "pruned", "torch")["attacks"] if a["name"] == "pgd")["mode"]
        == "white-box"
    )
    assert ort["parity"]["top1_agreement"] == 1.0
    assert ort["parity"]["max_abs_diff"] < 1e-3
    assert "relative_mce" in ort["corruptions"]

    assert report["parity"]["pruned"]["top1_agreement"] == 1.0
    assert {(r["model"], r["batch"]) for r in report["latency"]} == {("dense", 1), ("pruned", 1)}
    assert all(r["p50_ms"] > 0 for r in report["latency"])
    assert [g["passed"] for g in report["gates"]] == [True, True] and report["passed"]
    assert {g["name"]: g["passed"] for g in report["intrinsic_gates"]} == {
        "budget-met": True,
        "engine-parity": True,
        "finite-logits": True,
        "evaluated-and-gated": True,
    }
    assert (out / "report.md").is_file() and (out / "report.html").is_file()
    plots = {p.name for p in (out / "plots").iterdir()}
    assert plots == {"accuracy.png", "corruptions.png", "robust_eps.png", "tradeoff.png", "channels.png"}


def test_artifacts_reload_and_onnx_metadata(tiny_run: tuple[Path, Report]) -> None:
    from exporters.onnx import read_onnx_metadata
    from toolchain.models import build_from_spec
    from toolchain.pruning import load_pruned

    out, _ = tiny_run
    example = torch.zeros(1, 3, 32, 32)
    model, _ = load_pruned(out / "finetune" / "model.pt", build_from_spec, example)
    meta = read_onnx_metadata(out / "export" / "pruned.onnx")
    assert json.loads(meta["class_names"])[:1] and meta["model"] == "pruned"
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, len(json.loads(meta["class_names"])))


def _mtimes(out: Path) -> dict[str, float]:
    return {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/stage.json")}


def test_resume_skips_finished_stages_and_reruns_only_downstream(
    tiny_run: tuple[Path, Report],
) -> None:
    out, report = tiny_run
    before = _mtimes(out)
    again = run_pipeline(recipe_from_dict(TINY_RECIPE), out, progress=False)
    assert _mtimes(out) == before  # nothing re-ran
    assert again.models == report.models

    changed = json.loads(json.dumps(TINY_RECIPE))
    changed["finetune"]["epochs"] = 2
    run_pipeline(recipe_from_dict(changed), out, progress=False)
    after = _mtimes(out)
    assert after["train"] == before["train"] and after["prune"] == before["prune"]
    assert all(after[s] != before[s] for s in ("finetune", "export", "validate", "bench"))


def test_validate_command_on_run_engine_and_on_a_bare_onnx_file(
    tiny_run: tuple[Path, Report], tmp_path: Path
) -> None:
    import shutil

    import yaml

    from toolchain.cli import main

    out, _ = tiny_run
    recipe_path = tmp_path / "tiny.yaml"
    recipe_path.write_text(yaml.safe_dump(TINY_RECIPE))

    # Inside the run directory: the PyTorch model is found, so PGD is replayed as transfer.
    code = main(
        [
            "validate",
            "--engine",
            str(out / "export" / "pruned.onnx"),
            "--recipe",
            str(recipe_path),
            "--out",
            str(tmp_path / "v1"),
            "--no-progress",
        ]
    )
    report = json.loads((tmp_path / "v1" / "report.json").read_text())
    assert code == 0 and report["passed"] and report["status"] == "completed"
    assert (tmp_path / "v1" / "report.html").is_file()
    (ev,) = report["evaluations"]
    assert report["engine"]["pytorch_reference"] is True
    # The engine's own run: its budget check applies to the engine's report too.
    assert [g["name"] for g in report["intrinsic_gates"]] == [
        "budget-met",
        "engine-parity",
        "finite-logits",
        "evaluated-and-gated",
    ]
    assert ev["runtime"] == "onnxruntime" and ev["parity"]["top1_agreement"] == 1.0
    assert {a["mode"] for a in ev["attacks"]} == {"transfer", "black-box"}
    assert ev["clean_accuracy"] > 0.2 and "per_corruption" in ev["corruptions"]

    # A user's own ONNX file: no PyTorch model, so white-box attacks are skipped and said so.
    bare = tmp_path / "mine.onnx"
    shutil.copy(out / "export" / "pruned.onnx", bare)
    code = main(
        [
            "validate",
            "--engine",
            str(bare),
            "--recipe",
            str(recipe_path),
            "--out",
            str(tmp_path / "v2"),
            "--no-progress",
        ]
    )
    report = json.loads((tmp_path / "v2" / "report.json").read_text())
    (ev,) = report["evaluations"]
    assert report["engine"]["pytorch_reference"] is False
    assert [a["mode"] for a in ev["attacks"]] == ["black-box"]
    assert [s["name"] for s in ev["skipped"]] == ["pgd"] and ev["parity"] is None
    # The recipe's parity gate cannot be evaluated without a reference: it fails closed.
    assert code == 1 and not report["passed"]
    # No pruning target and no PyTorch reference: only the NaN/Inf check applies (and the recipe
    # has gates and the file was evaluated).
    assert [(g["name"], g["passed"]) for g in report["intrinsic_gates"]] == [
        ("finite-logits", True),
        ("evaluated-and-gated", True),
    ]


def test_validate_command_rejects_bad_engines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from toolchain.cli import main

    recipe_path = tmp_path / "tiny.yaml"
    recipe_path.write_text(yaml.safe_dump(TINY_RECIPE))
    assert main(["validate", "--engine", str(tmp_path / "none.onnx"), "--recipe", str(recipe_path)]) == 2
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    assert main(["validate", "--engine", str(junk), "--recipe", str(recipe_path)]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and "junk.onnx" in err


def test_an_interrupted_run_resumes_without_redoing_finished_stages(
    tiny_run: tuple[Path, Report], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    import toolchain.stages.finetune as finetune_stage

    out = tmp_path / "run"
    shutil.copytree(tiny_run[0], out)
    before = _mtimes(out)
    changed = json.loads(json.dumps(TINY_RECIPE))
    changed["finetune"]["lr"] = 0.03
    real_train = finetune_stage.train_model

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("desc") == "finetune":
            raise KeyboardInterrupt  # the user pressed Ctrl-C during fine-tuning
        return real_train(*args, **kwargs)

    monkeypatch.setattr(finetune_stage, "train_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(recipe_from_dict(changed), out, progress=False)
    monkeypatch.setattr(finetune_stage, "train_model", real_train)
    assert _mtimes(out) == before  # nothing was recorded as finished by the interrupted stage

    report = run_pipeline(recipe_from_dict(changed), out, progress=False)
    after = _mtimes(out)
    assert after["train"] == before["train"] and after["prune"] == before["prune"]
    assert after["finetune"] != before["finetune"]
    assert report.models.pruned is not None
    assert report.models.pruned.macs_reduction == pytest.approx(2.0, rel=0.05)


def test_validate_a_foreign_fixed_batch_onnx_without_metadata(tmp_path: Path) -> None:
    import warnings

    import yaml
    from torch import nn

    from toolchain.cli import main

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 12)
    )
    path = tmp_path / "theirs.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(
            net.eval(), (torch.rand(1, 3, 32, 32),), str(path), input_names=["image"], dynamo=False
        )
    recipe = json.loads(json.dumps(TINY_RECIPE))
    recipe["validate"]["samples"] = 20
    recipe["gates"] = [{"metric": "evaluations[runtime=onnxruntime].clean_accuracy", "threshold": 0.0}]
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "v"
    assert (
        main(
            [
                "validate",
                "--engine",
                str(path),
                "--recipe",
                str(recipe_path),
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    (ev,) = report["evaluations"]
    assert ev["samples"] == 20 and ev["model"] == "engine"
    assert [a["mode"] for a in ev["attacks"]] == ["black-box"] and ev["attacks"][0]["samples"] == 20
    assert set(ev["corruptions"]["per_corruption"]) == {"gaussian_noise", "fog"}


def test_a_method_that_trains_inside_pruning_runs_through_the_pipeline(
    tiny_run: tuple[Path, Report], tmp_path: Path
) -> None:
    import shutil

    out, _ = tiny_run
    copy = tmp_path / "dnr"
    shutil.copytree(out, copy)
    before = _mtimes(copy)
    recipe = json.loads(json.dumps(TINY_RECIPE))
    recipe["prune"] = {
        "method": "dnr",
        "target": {"macs_reduction": 2.0},
        "dnr": {"train": {"epochs": 2, "attack": {"eps": "2/255", "steps": 1}}, "update_every": 4},
        "bn_recalibration_batches": 4,
    }
    recipe["finetune"]["epochs"] = 0  # DNR ends at the budget, trained: no fine-tune stage work
    report = run_pipeline(recipe_from_dict(recipe), copy, progress=False).to_json()
    assert _mtimes(copy)["train"] == before["train"]  # the same dense model, not retrained
    pruned = report["models"]["pruned"]
    assert pruned["method"] == "dnr" and abs(pruned["macs_reduction"] / 2.0 - 1) <= 0.05
    record = json.loads((copy / "prune" / "stage.json").read_text())["result"]
    assert record["target_met"] and record["info"]["regrown_total"] > 0
    assert _eval(report, "pruned", "onnxruntime")["parity"]["top1_agreement"] == 1.0


def test_a_crafted_model_file_cannot_make_validate_import_code(
    tiny_run: tuple[Path, dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Someone else's run directory whose model file names a factory: refused, nothing imported."""
    import shutil
    import sys

    import yaml

    from toolchain.cli import main

    out, _ = tiny_run
    theirs = tmp_path / "theirs"
    shutil.copytree(out, theirs)
    model_file = theirs / "finetune" / "model.pt"
    payload = torch.load(model_file, weights_only=True)
    payload["spec"]["arch"] = "tests.planted_factory:evil"  # a module that must never be imported
    torch.save(payload, model_file)
    recipe_path = tmp_path / "tiny.yaml"
    recipe_path.write_text(yaml.safe_dump(TINY_RECIPE))
    engine = str(theirs / "export" / "pruned.onnx")
    code = main(["validate", "--engine", engine, "--recipe", str(recipe_path), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "model.pt' does not match the sha256 its stage.json recorded" in err
    # A checksum proves integrity, not origin: whoever crafted the file can record its sha256
    # too. The factory is still refused, and never imported.
    record_path = theirs / "finetune" / "stage.json"
    record = json.loads(record_path.read_text())
    record["checksums"]["model.pt"] = sha256_file(model_file)
    record_path.write_text(json.dumps(record))
    code = main(["validate", "--engine", engine, "--recipe", str(recipe_path), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "names the factory 'tests.planted_factory:evil'" in err
    assert "tests.planted_factory" not in sys.modules
