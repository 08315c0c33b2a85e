"""``quantize.qat`` in the recipe and the pipeline: validation, the INT8 gate, a run through the
CLI on a tiny recipe (16 px, 96 training images), and a SIGKILL in the middle of QAT resumed."""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
import yaml
from onnx import numpy_helper

from exporters import tensorrt_runner as trt_runner_module
from exporters.tensorrt import TensorRTRunner
from tests.conftest import one_torch_thread
from tests.test_tensorrt import fake_tensorrt, install, named
from toolchain.cli import main
from toolchain.errors import RecipeError
from toolchain.pipeline import run_pipeline
from toolchain.recipe import recipe_from_dict
from toolchain.report.quantization import quantization_gates
from toolchain.stages import runners as stage_runners
from toolchain.training import train_model

PGD1 = {"eps": "2/255", "step_size": "1/255", "steps": 1}
# 96 images in batches of 24: 4 optimiser steps per epoch, 8 in QAT's two epochs.
QAT_RECIPE: dict[str, Any] = {
    "version": 1,
    "name": "qat",
    "seed": 1,
    "data": {"dataset": "signs", "image_size": 16, "train_samples": 96, "val_samples": 32, "batch_size": 24},
    "model": {"arch": "convnet"},
    "train": {"epochs": 1, "lr": 0.05, "loss": "clean"},
    "prune": {
        "criterion": "magnitude",
        "target": {"macs_reduction": 1.5},
        "steps": 1,
        "importance_batches": 1,
        "finetune_between": {"epochs": 0},
        "bn_recalibration_batches": 1,
    },
    "finetune": {"epochs": 1, "lr": 0.01, "loss": "pgd", "attack": PGD1},
    "export": {"parity_samples": 16},
    "quantize": {
        "enabled": True,
        "calibrations": [],
        "samples": 32,
        "qat": {"epochs": 2},
        # The tiny model's numbers are not the point: the gates must exist and find their metrics
        # (the slowdown is a timing, which a busy machine decides).
        "gate": {
            "max_slowdown": None,
            "max_clean_drop": 1,
            "max_pgd_drop": 1,
            "max_corruption_drop": 1,
            "min_agreement": 0,
            "min_adversarial_agreement": 0,
        },
    },
    "validate": {
        "samples": 32,
        "batch_size": 16,
        "attacks": [{"name": "pgd", "eps": "4/255", "steps": 2}],
        "corruptions": {"names": ["gaussian_noise"], "severities": [3]},
    },
    "bench": {"enabled": False},
}
QAT_FILE = "pruned.int8-u8s8-qat.onnx"


def test_qat_is_off_by_default_and_keeps_the_recipe_hashes() -> None:
    recipe = recipe_from_dict({})
    assert recipe.quantize.qat is None
    # Pinned hashes: an unset qat adds nothing to them, so no cached stage and no report goes
    # stale. (They changed once on purpose since quantize.qat came in: quantize.methods gained
    # nncf, so auto measures one more method and cached INT8 files are redone.)
    assert (
        recipe.section_hash("quantize") == "35f551940f0976d21d137c8c9d416da77a18800aaabc5a45d29bdb0fde7a7989"
    )
    assert recipe.sha256() == "0f188231e78903ae144278435b29c523fbfab87d1482a8e2cbfa3d13a25c2704"


def test_qat_takes_finetunes_robust_loss_unless_it_sets_its_own() -> None:
    base = {"finetune": {"loss": "trades", "trades_beta": 3.0, "attack": {"eps": "4/255"}}}
    inherited = recipe_from_dict({**base, "quantize": {"enabled": True, "qat": {}}}).quantize.qat
    assert inherited is not None
    assert (inherited.loss, inherited.trades_beta, inherited.attack.eps) == (
        "trades",
        3.0,
        pytest.approx(4 / 255),
    )
    assert (inherited.epochs, inherited.lr) == (2, 0.001)  # its own loop settings, not finetune's
    own = recipe_from_dict({**base, "quantize": {"enabled": True, "qat": {"loss": "pgd"}}}).quantize.qat
    assert own is not None and own.loss == "pgd"


@pytest.mark.parametrize(
    ("quantize", "message"),
    [
        ({"qat": {"epochs": 2}}, "qat writes an INT8 file: it needs quantize.enabled: true"),
        (
            {"enabled": True, "qat": {"epochs": 0}},
            "quantize.qat.epochs: Input should be greater than or equal to 1",
        ),
        ({"enabled": True, "qat": {"init": "kl"}}, "quantize.qat.init"),
        ({"enabled": True, "qat": {"learn_scale": False}}, "unknown key 'quantize.qat.learn_scale'"),
        (
            {"enabled": True, "calibrations": []},
            "calibrations must not be empty (it may be [] when qat is set)",
        ),
        (
            {"enabled": True, "qat": {}, "calibrations": [], "gate": {"calibration": "clean"}},
            "gate.calibration",
        ),
        (
            {"enabled": True, "method": "nncf", "targets": ["onnxruntime", "tensorrt"]},
            "method nncf writes files for the onnxruntime target only",
        ),
        (
            {"enabled": True, "methods": ["nncf"], "targets": ["tensorrt"]},
            "method nncf writes files for the onnxruntime target only",
        ),
    ],
)
def test_bad_qat_settings_are_refused_naming_the_key(quantize: dict[str, Any], message: str) -> None:
    with pytest.raises(RecipeError, match=None) as caught:
        recipe_from_dict({"quantize": quantize})
    assert message in str(caught.value)


def test_a_bad_qat_setting_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = json.loads(json.dumps(QAT_RECIPE))
    recipe["quantize"]["qat"] = {"epochs": 2, "lr": -0.1}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code = main(["run", str(path), "--out", str(tmp_path / "run")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert lines == [lines[-1]] and "quantize.qat.lr: Input should be greater than 0" in lines[-1]
    assert not (tmp_path / "run").exists()


def test_the_int8_gate_judges_the_qat_files() -> None:
    recipe = recipe_from_dict({"quantize": {"enabled": True, "calibrations": ["clean"], "qat": {}}})
    calibrations = {g.metric.split("calibration=")[1].split("]")[0] for g in quantization_gates(recipe)}
    assert calibrations == {"clean", "qat"}


def _write(tmp_path: Path) -> Path:
    path = tmp_path / "qat.yaml"
    path.write_text(yaml.safe_dump(QAT_RECIPE))
    return path


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny QAT recipe through the CLI, in this process on one torch thread (as the killed
    subprocesses below run)."""
    tmp = tmp_path_factory.mktemp("qat")
    out = tmp / "run"
    with one_torch_thread():
        assert main(["run", str(_write(tmp)), "--out", str(out), "--no-progress"]) == 0
    return out


@pytest.mark.e2e
def test_a_qat_recipe_runs_through_the_cli_and_the_report_records_it(qat_run: Path) -> None:
    report = json.loads((qat_run / "report.json").read_text())
    (entry,) = report["quantization"]
    assert (entry["calibration"], entry["method"], entry["scheme"], entry["file"]) == (
        "qat",
        "qat",
        "u8s8",
        QAT_FILE,
    )
    assert entry["qat"]["epochs"] == 2 and [h["epoch"] for h in entry["qat"]["history"]] == [1, 2]
    assert entry["qat"]["loss"] == "pgd" and entry["qat"]["unmatched_nodes"] == []
    assert entry["qat"]["rounded_outputs"] == []  # the convnet has no residual addition
    assert entry["fusion"]["all_integer"] and entry["fusion"]["integer_conv"] == entry["fusion"]["conv_nodes"]
    # The measured speed ratio, from the quantize stage's own timing (the bench stage is off).
    speed = entry["vs_fp32"]["speedup"]
    assert set(speed) == {"1"} and speed["1"] > 0
    assert entry["vs_fp32"]["slowdown"] == pytest.approx(1 / speed["1"])
    # Validated like a PTQ file: agreement with FP32 and the attack's drop.
    assert entry["vs_fp32"]["evaluated"] and entry["vs_fp32"]["top1_agreement"] is not None
    assert entry["vs_fp32"]["attack_drop"] is not None
    int8 = [e for e in report["evaluations"] if e["precision"] == "int8"]
    assert [(e["runtime"], e["calibration"]) for e in int8] == [("onnxruntime", "qat")]
    gated = [g for g in report["gates"] if "calibration=qat" in g["metric"]]
    assert len(gated) == 5 and all(g["passed"] for g in gated)
    assert not list((qat_run / "quantize").glob(".checkpoint*"))  # removed once QAT completed


def _scales(path: Path) -> dict[str, np.ndarray]:
    graph = onnx.load(str(path)).graph
    return {i.name: numpy_helper.to_array(i) for i in graph.initializer if i.name.endswith("_scale")}


def _subprocess_run(recipe: Path, out: Path, kill_at: str | None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    env.pop("ROBUSTPRUNE_KILL_AT", None)
    if kill_at:
        env["ROBUSTPRUNE_KILL_AT"] = kill_at
    command = [sys.executable, "-m", "toolchain", "run", str(recipe), "--out", str(out), "--no-progress"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.e2e
def test_qat_killed_mid_epoch_resumes_to_the_same_file(qat_run: Path, tmp_path: Path) -> None:
    recipe, out = _write(tmp_path), tmp_path / "run"
    killed = _subprocess_run(recipe, out, "step:qat@6")  # epoch 1 checkpointed, epoch 2 half done
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (out / "quantize" / ".checkpoint-qat-pruned-onnxruntime.pt").is_file()
    assert not (out / "quantize" / "stage.json").exists()
    resumed = _subprocess_run(recipe, out, None)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "qat: resuming after epoch 1/2" in resumed.stderr
    assert "stage finetune up to date, skipped" in resumed.stderr
    scales, reference = _scales(out / "quantize" / QAT_FILE), _scales(qat_run / "quantize" / QAT_FILE)
    assert scales.keys() == reference.keys() and all(np.array_equal(scales[k], reference[k]) for k in scales)
    history = json.loads((out / "report.json").read_text())["quantization"][0]["qat"]["history"]
    reference_history = json.loads((qat_run / "report.json").read_text())["quantization"][0]["qat"]["history"]
    assert history == reference_history


@pytest.mark.e2e
def test_a_tensorrt_target_gets_a_symmetric_qat_file_that_the_engine_stage_builds(
    qat_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the fake TensorRT (host memory, a 16x16 'engine'): the s8s8 QAT file becomes an INT8
    engine of calibration qat; training, pruning and export are resumed from the CLI run."""
    rec = install(monkeypatch, fake_tensorrt("10.3.0"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(trt_runner_module, "_require_cuda", lambda device: None)
    monkeypatch.setattr(TensorRTRunner, "_stream_handle", lambda self: 0)
    monkeypatch.setattr(stage_runners, "TensorRTRunner", functools.partial(TensorRTRunner, device="cpu"))
    out = tmp_path / "run"
    shutil.copytree(qat_run, out)
    recipe = json.loads(json.dumps(QAT_RECIPE))
    recipe["quantize"].update(targets=["onnxruntime", "tensorrt"], gate=None)
    recipe["engine"] = {"precisions": ["int8"], "min_batch": 2, "opt_batch": 2, "max_batch": 4}
    recipe["bench"] = {
        "enabled": True,
        "runtimes": ["tensorrt"],
        "batch_sizes": [2],
        "iterations": 2,
        "warmup": 1,
    }
    recipe["allow_unverified"] = True
    recipe["device"] = "cpu"  # the fake CUDA is for the TensorRT runner only
    with one_torch_thread():
        report = run_pipeline(recipe_from_dict(recipe), out, progress=False).to_json()
    files = {q["target"]: q for q in report["quantization"]}
    assert {t: (q["scheme"], q["method"], q["file"]) for t, q in files.items()} == {
        "onnxruntime": ("u8s8", "qat", QAT_FILE),
        "tensorrt": ("s8s8", "qat", "pruned.int8-s8s8-qat.onnx"),
    }
    assert [(e["model"], e["precision"], e["calibration"]) for e in report["engines"]] == [
        ("pruned", "int8", "qat")
    ]
    assert [c[1] for c in named(rec, "parse_from_file")] == ["pruned.int8-s8s8-qat.onnx"]
    assert len(named(rec, "build_serialized_network")) == 1


@pytest.mark.e2e
def test_distillation_in_qat_learns_from_the_fp32_model_it_quantises(
    qat_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from toolchain.stages import qat as qat_stage

    teachers: list[Any] = []

    def recording(*args: Any, **kwargs: Any) -> Any:
        teachers.append(kwargs["teacher"])
        return train_model(*args, **kwargs)

    monkeypatch.setattr(qat_stage, "train_model", recording)
    out = tmp_path / "run"
    shutil.copytree(qat_run, out)
    recipe = json.loads(json.dumps(QAT_RECIPE))
    recipe["quantize"]["qat"]["loss"] = "rslad"
    with one_torch_thread():
        report = run_pipeline(recipe_from_dict(recipe), out, progress=False).to_json()
    assert report["quantization"][0]["qat"]["loss"] == "rslad"
    (teacher,) = teachers
    # The pruned FP32 model (the dense one has more parameters): the INT8 file learns to agree
    # with its own FP32 file.
    params = sum(p.numel() for p in teacher.parameters())
    assert params == report["models"]["pruned"]["params"] < report["models"]["dense"]["params"]


@pytest.mark.e2e
def test_qat_with_a_target_agreement_keeps_the_searched_layers_in_float(
    qat_run: Path, tmp_path: Path
) -> None:
    """``quantize.target_agreement`` shapes the QAT file too: the search's layers stay float in
    the file, and the report says which, with the held-out agreement before and after."""
    recipe = json.loads(json.dumps(QAT_RECIPE))
    # 32 calibration images and the 64 other training images held out; a target the tiny model
    # does not meet with every layer rounded, so the search keeps layers in float.
    recipe["quantize"].update({"target_agreement": 1.0, "holdout_samples": 64})
    path, out = tmp_path / "mixed.yaml", tmp_path / "run"
    path.write_text(yaml.safe_dump(recipe))
    shutil.copytree(qat_run, out)  # trained, pruned and fine-tuned already
    with one_torch_thread():
        assert main(["run", str(path), "--out", str(out), "--no-progress"]) == 0
    (entry,) = json.loads((out / "report.json").read_text())["quantization"]
    mixed = entry["mixed_precision"]
    assert mixed["target"] == 1.0 and mixed["adversarial_target"] == 1.0
    assert mixed["all_int8"]["clean"] < 1.0 or mixed["all_int8"]["adversarial"] < 1.0
    kept = mixed["fp32_nodes"]
    assert kept and set(mixed["sensitivity"]) >= set(kept)
    assert len(kept) < len(mixed["sensitivity"])  # QAT keeps at least one layer to quantise
    assert mixed["met"] == (min(mixed["final"].values()) >= 1.0)
    # The trained file measured again on the same held-out images.
    assert set(entry["holdout_agreement"]) == {"clean", "adversarial"}
    assert all(0 <= v <= 1 for v in entry["holdout_agreement"].values())
    # Each layer kept in float is one float convolution (or product) in the file, none unmatched.
    qat = entry["qat"]
    assert len(qat["float_nodes"]) == len(kept) and qat["unmatched_nodes"] == []
    assert qat["layers"] == len(mixed["sensitivity"]) - len(kept)
    assert entry["fusion"]["conv_nodes"] - entry["fusion"]["integer_conv"] <= len(kept)


@pytest.mark.parametrize(("float_nodes", "warned"), [([], True), (["node_conv2d_2"], False)])
def test_convolutions_kept_float_on_purpose_are_not_warned_about(
    float_nodes: list[str], warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    from toolchain.report.stage_results import QuantizedFile
    from toolchain.stages.quantize import _warn_unfused

    record = QuantizedFile(
        model="pruned",
        target="onnxruntime",
        scheme="u8s8",
        calibration="qat",
        file=QAT_FILE,
        fusion={"conv_nodes": 4, "integer_conv": 3, "float_conv": 1, "all_integer": False},
        qat={"float_nodes": float_nodes},
    )
    with caplog.at_level("WARNING", logger="toolchain.stages.quantize"):
        _warn_unfused(record)
    assert ("fused only 3 of 4 convolutions" in caplog.text) == warned
