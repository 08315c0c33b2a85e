"""The bad-input battery, through the command line: each case exits 2 (or 1 for a failed gate)
with one line that says what is wrong and how to fix it, prints no traceback, and leaves an
existing run directory byte for byte as it was, but for its report.json marked stale (a refused
run leaves no old verdict behind).

Cases the issue lists that other modules already test at this level are not repeated here:
unknown keys and a checkpoint of another architecture (test_cli), a non-ONNX file and a crafted
checkpoint naming a foreign factory (test_e2e). docs/troubleshooting.md lists every case and the
line it gives.
"""

from __future__ import annotations

import errno
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from tests.conftest import TINY_RECIPE
from toolchain import rundir, runlock
from toolchain.cli import main
from toolchain.rundir import RunDir


@pytest.fixture
def existing(tmp_path: Path) -> Path:
    """A run directory holding a previous run's files, which no bad input may touch."""
    root = tmp_path / "previous"
    (root / "train").mkdir(parents=True)
    (root / "run.json").write_text('{"tool": "robustprune"}')
    (root / "recipe.yaml").write_text("name: previous\n")
    (root / "report.json").write_text('{"status": "completed", "passed": true}')
    (root / "train" / "model.pt").write_bytes(b"previous weights")
    (root / "train" / "stage.json").write_text('{"key": "k"}')
    return root


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def marked_stale(before: dict[str, bytes]) -> dict[str, bytes]:
    """``before`` with its report.json marked stale, numbers kept: what bad input may change
    (the previous verdict is no verdict for a run that was refused)."""
    report = {**json.loads(before["report.json"]), "status": "stale", "passed": False}
    return {**before, "report.json": (json.dumps(report, indent=2) + "\n").encode()}


def refused(capsys: pytest.CaptureFixture[str], code: int, expected: str, *, exit_code: int = 2) -> str:
    """Assert the one-line refusal and return it."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == exit_code, err
    assert "Traceback" not in err
    assert [line for line in lines if line.startswith("robustprune: error:")] == [lines[-1]]
    assert expected in lines[-1], lines[-1]
    return lines[-1]


def recipe(**changes: Any) -> dict[str, Any]:
    """TINY_RECIPE with ``section__key`` (or top-level ``key``) replaced."""
    out = json.loads(json.dumps(TINY_RECIPE))
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            out[section][field] = value
        else:
            out[section] = value
    return out


def image_root(tmp_path: Path, broken: bool = False, empty: bool = False) -> str:
    """An image folder with two classes; optionally a broken .png, or no images at all."""
    for split in ("train", "val"):
        for i, cls in enumerate(("a", "b")):
            folder = tmp_path / "images" / split / cls
            folder.mkdir(parents=True)
            if not empty:
                for j in range(3):
                    Image.new("RGB", (8, 8), (100 * i, 50 * j, 0)).save(folder / f"{j}.png")
    if broken:
        (tmp_path / "images" / "train" / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    return str(tmp_path / "images")


class _Planted:
    """Unpickling this would create a file: the proof a loader ran code from a checkpoint."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return (Path.touch, (self.target,))


RECIPE_CASES: dict[str, tuple[Callable[[Path], str | dict[str, Any]], str]] = {
    "malformed-yaml": (lambda _: "train: [unclosed\n", "is not valid YAML"),
    "wrong-type": (lambda _: recipe(train__epochs="many"), "train.epochs"),
    "eps-out-of-range": (
        lambda _: recipe(train__attack={"eps": 8, "steps": 1}),
        "L-inf eps 8 exceeds the [0, 1] pixel range; write it as a fraction: 8/255",
    ),
    "severity-out-of-range": (
        lambda _: recipe(validate__corruptions={"names": ["fog"], "severities": [0, 6]}),
        "severities must be 1..5",
    ),
    "run-name-with-path-separators": (lambda _: recipe(name="../../etc"), "name"),
    "missing-dataset": (
        lambda tmp: recipe(data={"dataset": "image-folder", "root": str(tmp / "nowhere")}),
        "is not a folder; expected root/train/<class>/*.png|jpg",
    ),
    "empty-dataset": (
        lambda tmp: recipe(data={"dataset": "image-folder", "root": image_root(tmp, empty=True)}),
        "no images under",
    ),
    "broken-image": (
        lambda tmp: recipe(data={"dataset": "image-folder", "root": image_root(tmp, broken=True)}),
        "broken.png",
    ),
    "untraceable-model": (
        lambda _: recipe(model={"arch": "tests.user_models:make_hard_coded_view"}),
        "add them to prune.ignored_layers (e.g. prune.ignored_layers: [net.conv2])",
    ),
    "apgd-t-on-two-classes": (
        lambda tmp: recipe(
            data={"dataset": "image-folder", "root": image_root(tmp)},
            validate__attacks=[{"name": "apgd-t", "eps": "4/255", "steps": 2}],
        ),
        "validate.attacks: 'apgd-t' needs a model with at least 4 classes",
    ),
    "autoattack-lite-on-two-classes": (  # its APGD-T part
        lambda tmp: recipe(
            data={"dataset": "image-folder", "root": image_root(tmp)},
            validate__attacks=[{"name": "autoattack-lite", "eps": "4/255", "steps": 2, "queries": 5}],
        ),
        "validate.attacks: 'autoattack-lite' (its part 'apgd-t') needs a model with at least 4 classes",
    ),
    "unknown-ignored-layer": (
        lambda _: recipe(
            model={"arch": "tests.user_models:make_hard_coded_view"}, prune__ignored_layers=["conv9"]
        ),
        "prune.ignored_layers: the model has no layer 'conv9'",
    ),
}


@pytest.mark.parametrize("case", list(RECIPE_CASES))
def test_bad_recipe_or_data_is_refused_before_anything_is_written(
    case: str, tmp_path: Path, existing: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make, expected = RECIPE_CASES[case]
    content = make(tmp_path)
    path = tmp_path / "recipe.yaml"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    before = snapshot(existing)
    code = main(["run", str(path), "--out", str(existing), "--no-progress"])
    refused(capsys, code, expected)
    assert snapshot(existing) == marked_stale(before)


def test_a_pickle_given_as_checkpoint_is_refused_and_never_unpickled(
    tmp_path: Path, existing: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    planted = tmp_path / "code-ran"
    checkpoint = tmp_path / "weights.pt"
    torch.save({"net.features.0.weight": _Planted(planted)}, checkpoint)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe(model={"arch": "convnet", "checkpoint": str(checkpoint)})))
    before = snapshot(existing)
    code = main(["run", str(path), "--out", str(existing), "--no-progress"])
    line = refused(capsys, code, "weights.pt")
    assert "weights-only" in line or "cannot read checkpoint" in line
    assert not planted.exists()
    assert snapshot(existing) == marked_stale(before)


def test_a_second_run_on_a_run_directory_in_use_exits_2(
    tmp_path: Path, existing: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(TINY_RECIPE))
    before = snapshot(existing)
    with RunDir.open(existing, {"name": "previous"}):  # as a running `robustprune run` holds it
        held = snapshot(existing)
        code = main(["run", str(path), "--out", str(existing), "--no-progress"])
        refused(capsys, code, "is in use by a running robustprune (pid ")
        assert snapshot(existing) == held
    assert snapshot(existing)["report.json"] == before["report.json"]


def _disk_error(code: int, path: Path) -> Callable[..., Any]:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise OSError(code, os.strerror(code), str(path))

    return fail


@pytest.mark.parametrize(
    ("where", "code", "expected"),
    [
        (rundir, errno.ENOSPC, "No space left on device; free disk space"),  # the first atomic write
        (runlock.os, errno.EROFS, "Read-only file system; free disk space or fix the permissions"),  # same
    ],
    ids=["full-disk", "read-only-disk"],
)
def test_a_full_or_read_only_disk_exits_2_and_keeps_the_previous_files(
    tmp_path: Path,
    existing: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    where: Any,
    code: int,
    expected: str,
) -> None:
    """Simulated where the disk fails first: the tests may run as root, for whom chmod makes
    nothing read-only."""
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(TINY_RECIPE))
    before = snapshot(existing)
    monkeypatch.setattr(where, "_fsync" if where is rundir else "open", _disk_error(code, existing))
    exit_code = main(["run", str(path), "--out", str(existing), "--no-progress"])
    monkeypatch.undo()
    refused(capsys, exit_code, expected)
    after = snapshot(existing)
    after.pop(".lock", None)  # created (empty) before the write that failed
    assert after == before


class _Net(nn.Module):
    """A tiny classifier; ``nan=True`` poisons its logits, as a broken export or overflow would."""

    def __init__(self, nan: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 12)
        self.poison = float("nan") if nan else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3))) + self.poison


def _onnx(path: Path, size: int = 32, nan: bool = False) -> Path:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(
            _Net(nan).eval(), (torch.rand(1, 3, size, size),), str(path), input_names=["x"], dynamo=False
        )
    return path


def _validate(tmp_path: Path, engine: Path, **changes: Any) -> int:
    path = tmp_path / "recipe.yaml"
    small = recipe(validate={"samples": 8, "batch_size": 8, "attacks": [], "corruptions": {"names": []}})
    for key, value in changes.items():
        section, _, field = key.partition("__")
        small[section][field] = value
    path.write_text(yaml.safe_dump(small))
    return main(["validate", "--engine", str(engine), "--recipe", str(path), "--out", str(tmp_path / "v")])


def test_a_truncated_onnx_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    engine = _onnx(tmp_path / "model.onnx")
    engine.write_bytes(engine.read_bytes()[: engine.stat().st_size // 2])
    refused(capsys, _validate(tmp_path, engine), "model.onnx")
    assert not (tmp_path / "v").exists()


def test_an_engine_given_images_of_the_wrong_shape_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = _onnx(tmp_path / "model.onnx", size=32)
    line = refused(capsys, _validate(tmp_path, engine, data__image_size=16), "engine takes 3x32x32 images")
    assert "set data.image_size" in line
    assert not (tmp_path / "v").exists()


def test_a_model_producing_nan_is_flagged_and_fails_its_gate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = _onnx(tmp_path / "model.onnx", nan=True)
    code = _validate(tmp_path, engine)
    assert code == 1  # a failed gate, not bad input
    report = json.loads((tmp_path / "v" / "report.json").read_text())
    (evaluation,) = report["evaluations"]
    assert evaluation["nonfinite_logits"] == 8 and evaluation["clean_accuracy"] == 0.0
    gates = {g["name"]: g for g in report["intrinsic_gates"]}
    assert gates["finite-logits"]["passed"] is False and report["passed"] is False
    assert "Traceback" not in capsys.readouterr().err


def test_ignoring_the_layer_the_error_names_makes_the_model_prunable() -> None:
    from tests.user_models import make_hard_coded_view
    from toolchain.errors import UserError
    from toolchain.pruning.trial import check_removal

    net = make_hard_coded_view(12)
    x = torch.rand(1, 3, 16, 16)
    with pytest.raises(UserError, match=r"output channels of 'conv2' are removed .*shape '\[-1, 16\]'"):
        check_removal(net, x, [net.fc])
    check_removal(net, x, [net.fc, net.conv2])  # conv keeps shrinking; conv2 keeps its 16 channels
    assert net.conv.out_channels == 16  # the check works on a copy


def _run_with_export(tmp_path: Path) -> Path:
    """A run directory whose export stage recorded ``pruned.onnx`` (and its sha256)."""
    root = tmp_path / "run"
    with RunDir.open(root, {"name": "tiny"}) as run:
        _onnx(run.stage_dir("export") / "pruned.onnx")
        run.finish("export", "k", {}, ["pruned.onnx"], {}, 1.0)
    return root / "export" / "pruned.onnx"


def test_validate_refuses_a_run_directory_file_that_is_not_the_one_its_stage_recorded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = _run_with_export(tmp_path)
    _onnx(engine, nan=True)  # another model written over it after its stage finished
    line = refused(capsys, _validate(tmp_path, engine), "pruned.onnx")
    assert "does not match the sha256 its stage.json recorded" in line
    assert not (tmp_path / "v" / "report.json").exists()


def test_validate_holds_the_lock_of_the_run_directory_it_reads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = _run_with_export(tmp_path)
    with RunDir.open(engine.parent.parent, {"name": "tiny"}):  # as a running `robustprune run` holds it
        refused(capsys, _validate(tmp_path, engine), "is in use by a running robustprune (pid ")
    assert _validate(tmp_path, engine) in (0, 1)  # a verdict, once the run is over


def test_out_of_memory_is_named_as_such_not_as_a_truncated_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxruntime as ort

    from exporters.runtimes import build_runner
    from toolchain.errors import ResourceError
    from toolchain.models import load_state_dict_file

    engine = _onnx(tmp_path / "model.onnx")

    def no_memory(*_: Any, **__: Any) -> Any:
        raise RuntimeError(
            "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory for requested buffer"
        )

    with monkeypatch.context() as patch:
        patch.setattr(ort, "InferenceSession", no_memory)
        with pytest.raises(
            ResourceError, match=r"^out of memory while loading model\.onnx into ONNX Runtime"
        ):
            build_runner("onnxruntime", path=engine)
        refused(capsys, _validate(tmp_path, engine), "out of memory while loading model.onnx")
    with monkeypatch.context() as patch:
        patch.setattr(torch, "load", lambda *_, **__: (_ for _ in ()).throw(MemoryError()))
        with pytest.raises(ResourceError, match="out of memory while reading checkpoint"):
            load_state_dict_file(_Net(False), tmp_path / "model.onnx")
    # The INT8 quantiser and its pre-processor (hole 8: their failures read "quantization
    # failed" before): memory and disk are named, and no INT8 file is written.
    import errno

    import numpy as np
    import onnxruntime.quantization as ortq

    from calibration.qdq import quantize_onnx

    pixels = np.random.default_rng(0).random((4, 3, 32, 32), dtype=np.float32)
    with monkeypatch.context() as patch:
        patch.setattr(
            ortq, "quantize_static", lambda *_, **__: (_ for _ in ()).throw(MemoryError("bad_alloc"))
        )
        with pytest.raises(ResourceError, match=r"^out of memory while quantizing model\.onnx"):
            quantize_onnx(engine, tmp_path / "int8.onnx", pixels)
    with monkeypatch.context() as patch:
        full = OSError(errno.ENOSPC, "No space left on device")
        patch.setattr(ortq, "quant_pre_process", lambda *_, **__: (_ for _ in ()).throw(full))
        with pytest.raises(ResourceError, match=r"^no space left on device while pre-processing model\.onnx"):
            quantize_onnx(engine, tmp_path / "int8.onnx", pixels)
    assert not (tmp_path / "int8.onnx").exists()
    # Anywhere else (training, attacks): still one line, exit 2, not "a bug".
    from toolchain import commands

    def oom(*_: Any, **__: Any) -> int:
        raise RuntimeError(
            "DefaultCPUAllocator: can't allocate memory: you tried to allocate 68719476736 bytes"
        )

    monkeypatch.setattr(commands, "run", oom)
    line = refused(capsys, main(["run", "r.yaml"]), "out of memory while running robustprune run")
    assert "lower the batch size" in line
