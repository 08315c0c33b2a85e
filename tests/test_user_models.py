"""Users' own models, of every task: a ``module:callable`` factory is checked against the recipe's
task, a segmentation model goes through the CLI, and what torch-pruning cannot follow in a model
is left alone or refused in one line (never an internal error)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from toolchain.cli import main
from toolchain.errors import UserError
from toolchain.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

SEGMENTATION: dict[str, Any] = {
    "version": 1,
    "name": "user-seg",
    "task": "segmentation",
    "data": {
        "dataset": "driving-scenes",
        "image_size": 32,
        "train_samples": 16,
        "val_samples": 4,
        "batch_size": 8,
    },
    "model": {"arch": "tests.user_models:make_segmenter"},
    "train": {"epochs": 1, "loss": "clean"},
    "prune": {
        "criterion": "magnitude",
        "target": {"macs_reduction": 1.5},
        "steps": 1,
        "finetune_between": {"epochs": 0},
        "bn_recalibration_batches": 1,
    },
    "finetune": {"epochs": 1, "loss": "clean"},
    "export": {"parity_samples": 4},
    "validate": {
        "samples": 4,
        "batch_size": 4,
        "attacks": [{"name": "pgd", "eps": "2/255", "steps": 1}],
        "corruptions": {"names": ["fog"], "severities": [2]},
    },
    "bench": {"enabled": False},
    # A run with no gate does not pass (the intrinsic evaluated-and-gated gate).
    "gates": [{"metric": "models.pruned.macs_reduction", "threshold": 1.0}],
}


@pytest.mark.e2e
def test_a_users_segmentation_model_goes_through_the_cli(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(SEGMENTATION))
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    rows = {(e["model"], e["runtime"]): e for e in report["evaluations"]}
    assert set(rows) == {(m, r) for m in ("dense", "pruned") for r in ("torch", "onnxruntime")}
    assert all(e["task"] == "segmentation" and 0.0 <= e["miou"] <= 1.0 for e in rows.values())
    assert rows["pruned", "onnxruntime"]["parity"]["top1_agreement"] > 0.99
    assert report["models"]["pruned"]["macs_reduction"] >= 1.5 * 0.95


def test_a_factory_is_checked_against_the_recipes_task() -> None:
    stats = {"in_channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3, "image_size": 32}
    seg = build_model("tests.user_models:make_segmenter", num_classes=9, task="segmentation", **stats)
    assert seg(torch.rand(2, 3, 32, 32)).shape == (2, 9, 32, 32)
    with pytest.raises(UserError, match=r"make_segmenter'.*classification needs \(N, num_classes\) logits"):
        build_model("tests.user_models:make_segmenter", num_classes=9, **stats)
    with pytest.raises(UserError, match=r"make'.*task segmentation needs \(N, num_classes, H, W\)"):
        build_model("tests.user_models:make", num_classes=9, task="segmentation", **stats)


def test_a_crash_inside_torch_pruning_tracing_is_a_one_line_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.tiny_models import ResidualNet
    from toolchain.pruning.depgraph import PruningGraph
    from toolchain.pruning.graph import build_graph

    def crash(*args: Any, **kwargs: Any) -> None:
        raise IndexError("index 3 is out of bounds for dimension 0 with size 2")

    monkeypatch.setattr(PruningGraph, "build_dependency", crash)
    with pytest.raises(
        UserError, match=r"torch-pruning cannot trace .*IndexError.*index 3 is out of bounds"
    ) as info:
        build_graph(ResidualNet().eval(), torch.zeros(1, 3, 16, 16))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("model", "kind"),
    [("TinyGhostNet", "folded channels"), ("MultiplierNet", "grouped convolution with a channel multiplier")],
)
def test_groups_torch_pruning_cannot_follow_are_left_alone_with_the_reason(model: str, kind: str) -> None:
    import tests.tiny_models as tiny
    from toolchain.pruning.masks import ChannelMasks

    net = getattr(tiny, model)().eval()
    masks = ChannelMasks(net, torch.zeros(1, 3, 16, 16), [net.fc], strict=False)
    assert [s.kind for s in masks.skipped] == [kind]
    assert masks.groups  # the rest of the model is still pruned


def test_frozen_batchnorm_becomes_batchnorm_and_frozen_layers_are_still_pruned() -> None:
    from torch import nn

    from toolchain.pruning.prune import prune_to_target

    stats = {"in_channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3, "image_size": 16}
    model = build_model("tests.user_models:make_frozen", num_classes=4, **stats)
    kinds = {type(m).__name__ for m in model.modules()}
    assert "FrozenBatchNorm2d" not in kinds and "BatchNorm2d" in kinds
    stem = model.net[0]
    assert not stem.weight.requires_grad
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 4, (8,))
    result = prune_to_target(
        model,
        example_inputs=x[:1],
        criterion="taylor",  # gradient-based: the frozen stem must get gradients to be ranked
        macs_reduction=2.0,
        importance_loader=[(x, y)],
        importance_batches=1,
        progress=False,
    )
    assert result.macs_reduction >= 1.9
    assert isinstance(model.net[1], nn.BatchNorm2d) and model.net[0].out_channels < 16  # pruned
    assert not model.net[0].weight.requires_grad  # the user's choice is kept
