"""Channel masks over dependency groups: masked == physically pruned, exact cost, budgets."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from tests.tiny_models import NUM_CLASSES, ConcatNet, ConvHeadNet, DepthwiseNet, GroupedNet, ResidualNet
from toolchain.errors import UserError
from toolchain.pruning.budget import Budget, BudgetError, allocate, check_reachable, pools_for
from toolchain.pruning.graph import classifier_layers, count_macs_params
from toolchain.pruning.masks import ChannelMasks

pytestmark = pytest.mark.usefixtures("one_thread")

X16 = torch.rand(1, 3, 16, 16)
X32 = torch.rand(1, 3, 32, 32)


def _tiny(cls: type[nn.Module]) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return cls().eval(), X16


def _torchvision(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=NUM_CLASSES).eval()
    for module in model.modules():  # non-trivial statistics, so eval-mode BN matters
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    return model, X32


CASES = {
    "residual": lambda: _tiny(ResidualNet),
    "concat": lambda: _tiny(ConcatNet),
    "depthwise": lambda: _tiny(DepthwiseNet),
    "grouped": lambda: _tiny(GroupedNet),
    "conv-head": lambda: _tiny(ConvHeadNet),
    "torchvision-resnet18": lambda: _torchvision("resnet18"),
    "torchvision-mobilenet_v3_small": lambda: _torchvision("mobilenet_v3_small"),
}


def _random_mask(masks: ChannelMasks, seed: int) -> torch.Tensor:
    """Drop a random number (0..allowed) of random positions in every group."""
    g = torch.Generator().manual_seed(seed)
    mask = masks.ones()
    for group, _ in masks.per_group(mask):
        n = int(torch.randint(0, group.positions - group.floor + 1, (1,), generator=g))
        mask[group.offset + torch.randperm(group.positions, generator=g)[:n]] = 0.0
    return mask


@pytest.mark.parametrize("case", sorted(CASES))
def test_masked_model_equals_pruned_model_and_cost_is_exact(case: str) -> None:
    model, x = CASES[case]()
    masks = ChannelMasks(model, x, classifier_layers(model, x))
    assert masks.cost(masks.ones()) == tuple(map(float, count_macs_params(model, x)))
    mask = _random_mask(masks, seed=1)
    assert 0 < int(mask.sum()) < masks.total
    predicted = masks.cost(mask)
    batch = torch.rand(3, *x.shape[1:], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        dense = model(batch)
        with masks.attached(lambda: mask):
            masked = model(batch)
        history = masks.remove(mask)
        pruned = model(batch)
    assert (masked - dense).abs().max() > 1e-3  # the mask did change the function
    assert float((masked - pruned).abs().max()) < 1e-4
    assert tuple(map(float, count_macs_params(model, x))) == pytest.approx(predicted, abs=0.5)
    assert history and all(isinstance(entry[0], str) for entry in history)


def test_grouped_conv_loses_the_same_positions_in_every_group() -> None:
    model, x = _tiny(GroupedNet)
    masks = ChannelMasks(model, x, classifier_layers(model, x))
    group = next(g for g in masks.groups if g.root == "features.0.0")
    assert (group.size, group.ch_groups, group.positions) == (32, 4, 8)
    mask = masks.ones()
    mask[group.offset + 3] = 0.0
    assert masks.removal_plan(mask)[group.key] == [3, 11, 19, 27]
    masks.remove(mask)
    assert model.features[1][0].in_channels == 28 and model.features[1][0].groups == 4


def test_soft_mask_passes_gradients_to_its_source() -> None:
    model, x = _tiny(ResidualNet)
    masks = ChannelMasks(model, x, classifier_layers(model, x))
    logits = torch.full((masks.total,), 2.0, requires_grad=True)
    with masks.attached(lambda: torch.sigmoid(logits)):
        model(torch.rand(2, 3, 16, 16)).sum().backward()
    # Every position gets a gradient except channels a ReLU left at zero on this batch.
    assert logits.grad is not None and int((logits.grad != 0).sum()) > 0.9 * masks.total


def test_detach_restores_the_dense_function() -> None:
    model, x = _tiny(ConcatNet)
    masks = ChannelMasks(model, x, classifier_layers(model, x))
    batch = torch.rand(2, 3, 16, 16)
    dense = model(batch)
    masks.attach(lambda: torch.zeros(masks.total))
    assert not torch.allclose(model(batch), dense)
    masks.detach()
    torch.testing.assert_close(model(batch), dense)


class AttentionNet(nn.Module):
    """Conv features mixed by multi-head attention: masks cannot stand in for removal."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc = nn.Linear(16, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.conv(x).flatten(2).transpose(1, 2)
        a, _ = self.attn(f, f, f)
        return self.fc(a.mean(1))


def test_unmaskable_group_names_the_layer_and_the_fix() -> None:
    model = AttentionNet().eval()
    with pytest.raises(UserError, match=r"'attn' \(MultiheadAttention\).*ignored_layers"):
        ChannelMasks(model, X16, [model.fc])
    relaxed = ChannelMasks(model, X16, [model.fc], strict=False)  # cost model only
    assert relaxed.total > 0


@pytest.mark.parametrize("allocation", ["layer", "block", "global"])
@pytest.mark.parametrize("reduction", [2.0, 3.0])
def test_allocation_meets_the_budget(allocation: str, reduction: float) -> None:
    model, x = _tiny(ResidualNet)
    masks = ChannelMasks(model, x, classifier_layers(model, x))
    scores = torch.rand(masks.total, generator=torch.Generator().manual_seed(0))
    budget = Budget("macs", reduction, tolerance=0.05)
    result = allocate(masks, scores, budget, pools_for(masks, allocation, block_depth=1))
    dense = masks.cost(masks.ones())[0]
    assert abs(dense / result.macs / reduction - 1) <= 0.05
    for group, values in masks.per_group(result.mask):
        assert int(values.sum()) >= group.floor
    masks.remove(result.mask)
    assert count_macs_params(model, x)[0] == pytest.approx(result.macs, abs=0.5)


def test_layer_allocation_keeps_the_top_scored_positions() -> None:
    model, x = _tiny(ConcatNet)
    masks = ChannelMasks(model, x, classifier_layers(model, x))
    scores = torch.arange(masks.total, dtype=torch.float32)  # later positions score higher
    result = allocate(masks, scores, Budget("macs", 2.0), pools_for(masks, "layer"))
    for _, values in masks.per_group(result.mask):
        kept = int(values.sum())
        assert values[-kept:].sum() == kept  # the highest-scored positions are the ones kept


def test_global_allocation_follows_scores_across_layers() -> None:
    model, x = _tiny(ConcatNet)
    masks = ChannelMasks(model, x, classifier_layers(model, x))
    scores = torch.ones(masks.total)
    loser = next(g for g in masks.groups if g.root == "right.0")
    scores[loser.span] = 0.0  # one layer scores lowest everywhere: only it loses channels
    result = allocate(masks, scores, Budget("macs", 1.2, tolerance=0.05), pools_for(masks, "global"))
    assert loser.floor <= int(result.mask[loser.span].sum()) < loser.positions
    for group, values in masks.per_group(result.mask):
        if group is not loser:
            assert int(values.sum()) == group.positions, group.root


def test_unreachable_budget_is_a_budget_error() -> None:
    model, x = _tiny(DepthwiseNet)
    masks = ChannelMasks(model, x, classifier_layers(model, x), max_layer_pruning=0.5)
    with pytest.raises(BudgetError, match="out of reach"):
        check_reachable(masks, Budget("macs", 50.0, max_layer_pruning=0.5))
    check_reachable(masks, Budget("macs", 2.0, max_layer_pruning=0.5))
