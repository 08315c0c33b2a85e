"""Channel pruning: criteria, budget search, head protection, save/load, torchvision models.

Models are tiny and inputs 16x16 (32x32 for torchvision), so the whole file runs in seconds.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from tests.tiny_models import (
    NUM_CLASSES,
    ConcatNet,
    ConvHeadNet,
    DepthwiseNet,
    GroupedNet,
    ResidualNet,
)
from toolchain.errors import CheckpointError, UnknownNameError, UserError
from toolchain.pruning import (
    CRITERIA,
    classifier_layers,
    compute_scores,
    count_macs_params,
    load_pruned,
    prune_to_target,
    save_pruned,
)
from toolchain.pruning.budget import BudgetError
from toolchain.robustness.attacks import pgd as pgd_module

X16 = torch.rand(1, 3, 16, 16)


pytestmark = pytest.mark.usefixtures("one_thread")


def make_loader(batches: int = 2, size: int = 16, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.rand(8, 3, size, size, generator=g), torch.randint(0, NUM_CLASSES, (8,), generator=g))
        for _ in range(batches)
    ]


def built(cls: type[nn.Module], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return cls().eval()


def test_registry_declares_gradient_needs() -> None:
    assert {"magnitude", "taylor", "adv-taylor", "random"} <= set(CRITERIA.names())
    assert CRITERIA.get("taylor").needs_gradients and CRITERIA.get("taylor").loss == "clean"
    assert CRITERIA.get("adv-taylor").loss == "adversarial"
    assert not CRITERIA.get("magnitude").needs_gradients
    with pytest.raises(UnknownNameError, match="adv-taylor"):
        prune_to_target(built(DepthwiseNet), example_inputs=X16, criterion="tayler", macs_reduction=2.0)


@pytest.mark.parametrize("criterion", CRITERIA.names())
@pytest.mark.parametrize("cls", [ResidualNet, ConcatNet, DepthwiseNet, GroupedNet])
def test_every_criterion_prunes_every_structure(cls: type[nn.Module], criterion: str) -> None:
    model = built(cls)
    dense_macs, _ = count_macs_params(model, X16)
    result = prune_to_target(
        model,
        example_inputs=X16,
        criterion=criterion,
        macs_reduction=1.6,
        tolerance=0.25,  # tiny layers move MACs in coarse steps
        importance_loader=make_loader(),
        importance_batches=2,
        attack={"eps": 2 / 255, "step_size": 1 / 255, "steps": 1},
        progress=False,
    )
    assert result.model is model
    assert result.macs < dense_macs and result.dense_macs == dense_macs
    assert abs(result.macs_reduction / 1.6 - 1) <= 0.25
    out = model(torch.rand(3, 3, 16, 16))
    assert out.shape == (3, NUM_CLASSES) and torch.isfinite(out).all()
    assert model.fc.out_features == NUM_CLASSES
    assert all(p.grad is None for p in model.parameters())  # Taylor gradients were cleared
    if cls is GroupedNet:
        grouped = model.features[1][0]
        assert grouped.groups == 4 and grouped.out_channels % 4 == 0 and grouped.out_channels < 32


@pytest.mark.parametrize("target", [2.0, 4.0])
def test_macs_target_met_within_tolerance(target: float) -> None:
    model = built(lambda: ResidualNet(width=32))
    calls: list[int] = []
    result = prune_to_target(
        model,
        example_inputs=X16,
        criterion="magnitude",
        macs_reduction=target,
        steps=2,
        between_steps=lambda m, i: calls.append(i),
        progress=False,
    )
    macs, params = count_macs_params(model, X16)
    assert (macs, params) == (result.macs, result.params)
    assert abs(result.dense_macs / macs / target - 1) <= 0.05
    assert calls == [1]  # after every step but the last
    assert [s["step"] for s in result.steps] == [1, 2]
    assert abs(result.steps[0]["macs_reduction"] / math.sqrt(target) - 1) <= 0.05
    assert model.fc.out_features == NUM_CLASSES


def test_params_target_and_round_to() -> None:
    model = built(lambda: ResidualNet(width=32))
    result = prune_to_target(
        model, example_inputs=X16, criterion="magnitude", params_reduction=2.0, round_to=8, progress=False
    )
    assert result.params_reduction > 1.5
    widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(w % 8 == 0 for w in widths), widths


def test_unreachable_target_is_refused_before_pruning() -> None:
    model = built(ConcatNet)
    dense = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    with pytest.raises(BudgetError, match=r"out of reach: .* smallest model has 3\.\d\dx fewer macs"):
        prune_to_target(
            model, example_inputs=X16, criterion="magnitude", macs_reduction=1000.0, max_layer_pruning=0.5
        )
    assert {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)} == dense


def test_max_layer_pruning_floor_holds_near_the_limit() -> None:
    model = built(ConcatNet)
    dense = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    result = prune_to_target(
        model,
        example_inputs=X16,
        criterion="magnitude",
        macs_reduction=3.6,
        max_layer_pruning=0.5,
        progress=False,
    )
    assert result.target_met and abs(result.macs_reduction / 3.6 - 1) <= 0.05
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            assert module.out_channels >= math.ceil(dense[name] * 0.5), name


@pytest.mark.parametrize(
    ("cls", "head"),
    [(ResidualNet, "fc"), (ConcatNet, "fc"), (ConvHeadNet, "head"), (DepthwiseNet, "fc")],
)
def test_classifier_layers_tiny(cls: type[nn.Module], head: str) -> None:
    model = built(cls)
    assert classifier_layers(model, X16) == [model.get_submodule(head)]


def test_classifier_layers_torchvision() -> None:
    x = torch.rand(1, 3, 32, 32)
    resnet = torchvision.models.resnet18(num_classes=NUM_CLASSES)
    mobilenet = torchvision.models.mobilenet_v3_small(num_classes=NUM_CLASSES)
    effnet = torchvision.models.efficientnet_b0(num_classes=NUM_CLASSES)
    assert classifier_layers(resnet, x) == [resnet.fc]
    assert classifier_layers(mobilenet, x) == [mobilenet.classifier[3]]
    assert classifier_layers(effnet, x) == [effnet.classifier[1]]


def test_conv_head_is_never_pruned() -> None:
    model = built(ConvHeadNet)
    prune_to_target(
        model, example_inputs=X16, criterion="magnitude", macs_reduction=1.5, tolerance=0.3, progress=False
    )
    assert model.head.out_channels == NUM_CLASSES and model.features[0].out_channels < 16


def test_save_load_round_trip(tmp_path) -> None:
    model = built(ResidualNet)
    result = prune_to_target(
        model,
        example_inputs=X16,
        criterion="taylor",
        macs_reduction=3.0,
        steps=2,
        tolerance=0.1,
        importance_loader=make_loader(),
        progress=False,
    )
    assert len(result.history) > 0
    assert json.loads(json.dumps(result.history)) == result.history
    path = tmp_path / "pruned.pt"
    save_pruned(
        path, spec={"width": 16}, history=result.history, state_dict=model.state_dict(), extra={"k": 1}
    )
    assert set(torch.load(path, weights_only=True)) >= {"spec", "history", "state_dict"}

    loaded, meta = load_pruned(path, lambda spec: built(lambda: ResidualNet(**spec), seed=1), X16)
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert meta["spec"] == {"width": 16} and meta["extra"] == {"k": 1}
    assert count_macs_params(loaded, X16) == (result.macs, result.params)


def test_load_errors_are_checkpoint_errors(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pruned(tmp_path / "missing.pt", lambda spec: ResidualNet(), X16)
    model = built(ResidualNet)
    result = prune_to_target(
        model, example_inputs=X16, criterion="magnitude", macs_reduction=2.0, progress=False
    )
    path = tmp_path / "pruned.pt"
    save_pruned(path, spec={}, history=result.history, state_dict=model.state_dict())
    with pytest.raises(CheckpointError):
        load_pruned(path, lambda spec: ResidualNet(width=8), X16)  # not the architecture it came from
    with pytest.raises(UserError, match="JSON"):
        save_pruned(path, spec={"bad": object()}, history=[], state_dict={})


def test_adv_taylor_uses_pgd_in_eval_mode_and_ranks_differently(monkeypatch: pytest.MonkeyPatch) -> None:
    real_attack = pgd_module.pgd_attack
    modes: list[bool] = []

    def counting_attack(model: nn.Module, *args, **kwargs) -> torch.Tensor:
        modes.append(model.training)
        return real_attack(model, *args, **kwargs)

    monkeypatch.setattr(pgd_module, "pgd_attack", counting_attack)
    model = built(ResidualNet).train()
    loader = make_loader(batches=3)
    attack = {"eps": 16 / 255, "step_size": 4 / 255, "steps": 3}
    clean = compute_scores(model, X16, "taylor", ignored_layers=[model.fc], loader=loader, batches=3)
    assert modes == []
    adv = compute_scores(
        model, X16, "adv-taylor", ignored_layers=[model.fc], loader=loader, batches=3, attack=attack
    )
    assert modes == [False, False, False]  # one attack per batch, crafted in eval mode
    assert model.training  # mode restored
    assert clean.keys() == adv.keys() and len(clean) > 0
    assert any(not torch.equal(clean[k].argsort(), adv[k].argsort()) for k in clean)
    with pytest.raises(UserError, match="unknown attack"):
        compute_scores(model, X16, "adv-taylor", loader=loader, attack={"epsilon": 0.1})


def test_scoring_leaves_bn_stats_and_grads_alone() -> None:
    model = built(ResidualNet).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compute_scores(model, X16, "taylor", ignored_layers=[model.fc], loader=make_loader(), batches=2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and model.training


def test_taylor_scores_match_hand_computation() -> None:
    """On a single conv-bn pair the group score is |w*g| of conv out, bn affine and fc in."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(NUM_CLASSES))
    model(X16)
    model.eval()
    x, y = make_loader(batches=1)[0]
    F.cross_entropy(model(x), y).backward()
    conv, bn, fc = model[0], model[1], model[3]
    expected = (conv.weight * conv.weight.grad).abs().flatten(1).sum(1) + (conv.bias * conv.bias.grad).abs()
    expected += (bn.weight * bn.weight.grad).abs() + (bn.bias * bn.bias.grad).abs()
    expected += (fc.weight * fc.weight.grad).abs().view(NUM_CLASSES, 4, -1).sum(dim=(0, 2))
    model.zero_grad(set_to_none=True)
    table = compute_scores(model, X16, "taylor", ignored_layers=[fc], loader=[(x, y)], batches=1)
    torch.testing.assert_close(table[("0", "prune_out_channels")], expected.detach(), rtol=1e-4, atol=1e-7)


def test_bad_budgets_are_user_errors() -> None:
    model = built(DepthwiseNet)
    with pytest.raises(UserError, match="exactly one"):
        prune_to_target(model, example_inputs=X16, criterion="magnitude", progress=False)
    with pytest.raises(UserError, match="> 1"):
        prune_to_target(model, example_inputs=X16, criterion="magnitude", macs_reduction=0.5, progress=False)
    with pytest.raises(UserError, match="importance_loader"):
        prune_to_target(model, example_inputs=X16, criterion="taylor", macs_reduction=2.0, progress=False)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small", "efficientnet_b0"])
def test_torchvision_models_pruned_to_half_macs(arch: str) -> None:
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None, num_classes=NUM_CLASSES).eval()
    x = torch.rand(1, 3, 32, 32)
    result = prune_to_target(
        model, example_inputs=x, criterion="magnitude", macs_reduction=2.0, progress=False
    )
    assert abs(result.macs_reduction / 2.0 - 1) <= 0.05, result.steps
    with torch.no_grad():
        out = model(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, NUM_CLASSES) and torch.isfinite(out).all()
