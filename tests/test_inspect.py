"""``robustprune inspect``: the groups, what is left alone and why, and a reachable-reduction
figure that pruning then achieves exactly."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from tests.tiny_models import AuxNet, ConcatNet, DepthwiseNet, GroupedNet, ResidualNet, tiny_vit
from toolchain.cli import main
from toolchain.pruning import prune_to_target
from toolchain.pruning.prunability import assess, check_forward

pytestmark = pytest.mark.usefixtures("one_thread")

X16 = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))

# (model, {group root: (channels, tied channel groups)}) worked out from each model's wiring.
EXPECTED = {
    "residual": (
        ResidualNet,
        {
            "stem.0": (16, 1),  # the stem and both stage-1 residual sums are one group
            "stage1.0.body.0.0": (16, 1),
            "stage1.1.body.0.0": (16, 1),
            "stage2.0.short": (32, 1),  # the projection shortcut joins the stage-2 sums
            "stage2.0.body.0.0": (32, 1),
            "stage2.1.body.0.0": (32, 1),
        },
    ),
    "concat": (ConcatNet, {"stem.0": (16, 1), "left.0": (12, 1), "right.0": (20, 1), "merge.0": (24, 1)}),
    # the depthwise conv ties its input and output: one group with the conv before it
    "depthwise": (DepthwiseNet, {"features.1.0": (16, 1), "features.2": (32, 1)}),
    "grouped": (GroupedNet, {"features.0.0": (32, 4), "features.1.0": (32, 4), "features.2.0": (24, 1)}),
}


def _built(cls: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return cls().eval()


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_inspect_lists_groups_and_the_head_left_alone(case: str) -> None:
    cls, groups = EXPECTED[case]
    report = assess(_built(cls), X16)
    assert {g.root: (g.channels, g.tied) for g in report.groups} == groups
    assert [(e.layer, e.channels, e.kind) for e in report.left_alone] == [("fc", 10, "classifier head")]
    assert all(g.floor == -(-g.positions // 10) for g in report.groups)  # max_layer_pruning 0.9
    assert sum(r.macs for r in report.layers) == report.dense_macs  # every MAC is in some layer
    assert report.max_macs_reduction > 4


@pytest.mark.parametrize("case", sorted(EXPECTED))
@pytest.mark.parametrize("max_layer_pruning", [0.5, 0.9])
def test_reachable_reduction_is_what_pruning_achieves(case: str, max_layer_pruning: float) -> None:
    cls, _ = EXPECTED[case]
    report = assess(_built(cls), X16, max_layer_pruning=max_layer_pruning)
    model = _built(cls)
    result = prune_to_target(
        model,
        example_inputs=X16,
        criterion="magnitude",
        macs_reduction=report.max_macs_reduction,
        max_layer_pruning=max_layer_pruning,
        progress=False,
    )
    assert result.target_met
    assert result.macs == pytest.approx(report.floor_macs, abs=0.5)
    assert result.params == pytest.approx(report.floor_params, abs=0.5)


def test_inspect_names_training_only_heads_and_tied_attention_heads() -> None:
    aux = assess(_built(AuxNet), X16)
    assert [(e.layer, e.kind) for e in aux.left_alone] == [
        ("fc", "classifier head"),
        ("aux", "training-only head"),
    ]
    assert "aux.0" in next(g.layers for g in aux.groups if g.root == "stem.0")  # its input follows
    vit = assess(tiny_vit().eval(), X16)
    assert sorted(g.tied for g in vit.groups) == [1, 1, 2]  # the residual width: two heads
    assert vit.mask_methods is not None and "MultiheadAttention" in vit.mask_methods


def test_a_model_that_cannot_run_in_train_mode_is_refused_naming_the_module() -> None:
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(768), nn.Linear(768, 10))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(x if not self.training else x[:1])  # BN sees one sample in train mode

    with pytest.raises(Exception, match=r"in train mode in 'head.1' \(BatchNorm1d\): ValueError"):
        check_forward(Broken(), X16)


def test_cli_inspect_a_model_name_writes_json(tmp_path, capsys) -> None:
    out = tmp_path / "report.json"
    code = main(["inspect", "tests.tiny_models:ResidualNet", "--input-size", "16", "--json", str(out)])
    text = capsys.readouterr().out
    assert code == 0
    report = json.loads(out.read_text())
    assert len(report["groups"]) == 6 and report["left_alone"][0]["layer"] == "net.fc"
    assert f"{report['max_macs_reduction']:.2f}x fewer MACs" in text
    assert text.startswith("tests.tiny_models:ResidualNet at 1x3x16x16:")


def test_cli_inspect_a_recipe_checks_its_target(capsys) -> None:
    code = main(["inspect", "deploy_examples/quickstart.yaml", "--set", "prune.target={macs_reduction: 400}"])
    text = capsys.readouterr().out
    assert code == 0
    assert "recipe target macs_reduction 400: OUT OF REACH" in text
    assert main(["inspect", "deploy_examples/quickstart.yaml"]) == 0
    assert "recipe target macs_reduction 4: reachable" in capsys.readouterr().out
    assert (
        main(["inspect", "deploy_examples/quickstart.yaml", "--set", "prune.target={latency_reduction: 2}"])
        == 0
    )
    assert "recipe target latency_reduction 2: searched by timing" in capsys.readouterr().out


def test_cli_inspect_unknown_model_is_a_usage_error(capsys) -> None:
    assert main(["inspect", "torchvision:no_such_net"]) == 2
    assert "unknown torchvision model 'no_such_net'" in capsys.readouterr().err


def test_cli_inspect_trial_exit_code_says_whether_the_model_goes_through(capsys, monkeypatch) -> None:
    assert main(["inspect", "tests.user_models:make", "--input-size", "16", "--trial"]) == 0
    out = capsys.readouterr().out
    assert (
        "trial: works (image_size=16, dense_macs=65644, macs=32828, macs_reduction=2, target_met=True" in out
    )
    import toolchain.stages.export

    def broken_export(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(toolchain.stages.export, "export_onnx", broken_export)
    assert main(["inspect", "tests.user_models:make", "--input-size", "16", "--trial"]) == 1
    out = capsys.readouterr().out
    assert (
        "trial: failed (image_size=16, stage=export, reason=RuntimeError: exporter crashed, seconds=" in out
    )
