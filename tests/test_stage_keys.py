"""Stage keys cover everything a stage reads, and a stage that runs again re-runs what follows.

Each test changes one input a recipe's text does not show (the checkpoint file, the images
under ``data.root``, a factory's source file, a damaged artifact, a runtime list) and checks
which stages ran again.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from toolchain.cli import main
from toolchain.pipeline import run_pipeline, stage_keys
from toolchain.recipe import recipe_from_dict
from toolchain.rundir import ENGINE, STAGE_NAMES, TRAIN, RunLayout

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("one_thread")]


def _recipe(**changes: Any) -> dict[str, Any]:
    recipe: dict[str, Any] = {
        "version": 1,
        "name": "keys",
        "data": {
            "dataset": "signs",
            "image_size": 16,
            "train_samples": 48,
            "val_samples": 8,
            "batch_size": 16,
        },
        "model": {"arch": "convnet", "width": 0.5},
        "train": {"epochs": 1, "loss": "clean"},
        "prune": {
            "criterion": "magnitude",
            "target": {"macs_reduction": 1.5},
            "steps": 1,
            "finetune_between": {"epochs": 0},
            "bn_recalibration_batches": 1,
        },
        "finetune": {"epochs": 1, "loss": "clean"},
        "export": {"parity_samples": 8},
        "validate": {"samples": 8, "batch_size": 8, "attacks": [], "corruptions": {"names": []}},
        "bench": {"enabled": False},
    }
    for section, value in changes.items():
        recipe[section] = {**recipe.get(section, {}), **value} if isinstance(value, dict) else value
    return recipe


def _mtimes(out: Path) -> dict[str, int]:
    layout = RunLayout(out)
    return {
        s: layout.record_path(s).stat().st_mtime_ns for s in STAGE_NAMES if layout.record_path(s).is_file()
    }


def _reran(before: dict[str, int], after: dict[str, int]) -> list[str]:
    return [s for s in STAGE_NAMES if s in before and after.get(s) != before[s]]


def test_an_overwritten_checkpoint_trains_again_and_changes_the_report(tmp_path: Path) -> None:
    from toolchain.models import build_model

    checkpoint = tmp_path / "start.pt"

    def write_checkpoint(seed: int) -> None:
        torch.manual_seed(seed)
        model = build_model(
            "convnet", num_classes=12, in_channels=3, mean=[0.5] * 3, std=[0.25] * 3, image_size=16, width=0.5
        )
        torch.save(model.state_dict(), checkpoint)

    write_checkpoint(1)
    recipe = recipe_from_dict(_recipe(model={"checkpoint": str(checkpoint)}, train={"epochs": 0}))
    out = tmp_path / "run"
    first = run_pipeline(recipe, out, progress=False)
    before = _mtimes(out)
    write_checkpoint(2)  # the same path, other weights
    second = run_pipeline(recipe, out, progress=False)
    assert _reran(before, _mtimes(out)) == list(STAGE_NAMES)
    # The dense model now is the second checkpoint's (epochs 0: kept as loaded), and the
    # report is that model's, not the first one's.
    saved = torch.load(RunLayout(out).model_file(TRAIN), weights_only=True)["state_dict"]
    wanted = torch.load(checkpoint, weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in wanted.items())
    assert first.to_json()["parity"]["dense"] != second.to_json()["parity"]["dense"]


def _write_images(root: Path, count: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for label in ("a", "b"):
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


def test_an_image_added_under_data_root_trains_again(tmp_path: Path) -> None:
    root = tmp_path / "images"
    _write_images(root, 6)
    recipe = recipe_from_dict(_recipe(data={"dataset": "image-folder", "root": str(root), "image_size": 16}))
    out = tmp_path / "run"
    run_pipeline(recipe, out, progress=False)
    before = _mtimes(out)
    run_pipeline(recipe, out, progress=False)
    assert _reran(before, _mtimes(out)) == []  # nothing changed: everything skipped
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(root / "train" / "a" / "new.png")
    run_pipeline(recipe, out, progress=False)
    assert _reran(before, _mtimes(out)) == list(STAGE_NAMES)


def test_an_edited_factory_source_trains_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "mine"
    package.mkdir()
    source = package / "nets.py"
    body = """
        from torch import nn

        def make(num_classes, in_channels=3):
            return nn.Sequential(
                nn.Conv2d(in_channels, {width}, 3, padding=1), nn.BatchNorm2d({width}), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear({width}, num_classes),
            )
    """
    source.write_text(textwrap.dedent(body.format(width=8)))
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = recipe_from_dict(_recipe(model={"arch": "mine.nets:make"}))
    out = tmp_path / "run"
    run_pipeline(recipe, out, progress=False)
    before = _mtimes(out)
    keys = stage_keys(recipe)
    source.write_text(textwrap.dedent(body.format(width=12)))
    assert stage_keys(recipe)[TRAIN] != keys[TRAIN]
    run_pipeline(recipe, out, progress=False)
    assert _reran(before, _mtimes(out)) == list(STAGE_NAMES)


def test_a_truncated_model_reruns_its_stage_and_every_later_one(tmp_path: Path) -> None:
    recipe = recipe_from_dict(_recipe())
    out = tmp_path / "run"
    run_pipeline(recipe, out, progress=False)
    before = _mtimes(out)
    model = RunLayout(out).model_file("prune")
    model.write_bytes(model.read_bytes()[:100])
    run_pipeline(recipe, out, progress=False)
    assert _reran(before, _mtimes(out)) == list(STAGE_NAMES[1:])  # prune and everything after


def test_adding_tensorrt_to_the_runtimes_changes_the_engine_key_and_is_refused_here(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    from exporters.runtimes import runtime_available

    plain = recipe_from_dict(_recipe())
    wanted = recipe_from_dict(_recipe(validate={"runtimes": ["torch", "onnxruntime", "tensorrt"]}))
    keys, more = stage_keys(plain), stage_keys(wanted)
    assert keys[ENGINE] != more[ENGINE]  # the engine stage runs for it (and what follows)
    assert all(keys[s] == more[s] for s in STAGE_NAMES[: STAGE_NAMES.index(ENGINE)])
    why = runtime_available("tensorrt")
    if why is None:
        pytest.skip("TensorRT is usable here; the refusal is for machines without it")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(_recipe(validate={"runtimes": ["torch", "onnxruntime", "tensorrt"]})))
    code = main(["run", str(path), "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "validate.runtimes lists 'tensorrt'" in err[0]
    assert why in err[0] and not (tmp_path / "run").exists()  # refused before anything was written
