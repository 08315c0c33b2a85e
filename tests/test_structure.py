"""Models torch-pruning cannot follow on its own: attention, channel shuffles, channels-last
blocks, training-only heads, state_dict metadata. Tiny torchvision-built models, 16x16 inputs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.swin_transformer import ShiftedWindowAttention

from tests.tiny_models import AuxNet, VersionedNet, tiny_shufflenet, tiny_swin, tiny_vit
from toolchain.pruning import count_macs_params, load_pruned, save_pruned
from toolchain.pruning.depgraph import RESHAPE, UNSUPPORTED
from toolchain.pruning.graph import build_graph, protected_layers
from toolchain.pruning.masks import ChannelMasks
from toolchain.pruning.structure import analyse

pytestmark = pytest.mark.usefixtures("one_thread")

X16 = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def tiny_convnext() -> nn.Module:
    """ConvNeXt blocks permute to channels-last for LayerNorm and two linear layers."""
    return ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], num_classes=10)


MODELS = {
    "vit": tiny_vit,
    "swin": tiny_swin,
    "shufflenet": tiny_shufflenet,
    "convnext": tiny_convnext,
    "aux": AuxNet,
}


def _built(name: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name]().eval()


def _random_mask(masks: ChannelMasks, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = masks.ones()
    for group, _ in masks.per_group(mask):
        n = int(torch.randint(1, group.positions - group.floor + 1, (1,), generator=g))
        mask[group.offset + torch.randperm(group.positions, generator=g)[:n]] = 0.0
    return mask


@pytest.mark.parametrize("name", sorted(MODELS))
def test_cost_model_is_exact_and_the_pruned_model_runs_and_reloads(name: str, tmp_path) -> None:
    model = _built(name)
    masks = ChannelMasks(model, X16, protected_layers(model, X16), strict=False)
    assert masks.groups, "every one of these models has prunable groups"
    assert masks.cost(masks.ones()) == tuple(map(float, count_macs_params(model, X16)))
    mask = _random_mask(masks, seed=1)
    predicted = masks.cost(mask)
    dense = copy.deepcopy(model)
    history = masks.remove(mask)
    assert tuple(map(float, count_macs_params(model, X16))) == pytest.approx(predicted, abs=0.5)
    assert predicted[0] < masks.cost(masks.ones())[0]
    batch = torch.rand(2, 3, 16, 16)
    model.train()  # training-only heads run too
    model(batch)
    model.eval()
    with torch.no_grad():
        pruned = model(batch)
    path = tmp_path / "pruned.pt"
    save_pruned(path, spec={"name": name}, history=history, state_dict=model.state_dict())
    reloaded, _ = load_pruned(path, lambda spec: copy.deepcopy(dense), X16)
    with torch.no_grad():
        assert torch.equal(reloaded(batch), pruned)


def test_analyse_finds_units_frozen_modules_and_training_only_heads() -> None:
    vit, swin, aux = _built("vit"), _built("swin"), _built("aux")
    assert [type(m).__name__ for m in analyse(vit, X16).units] == ["MultiheadAttention"] * 2
    assert set(analyse(swin, X16).frozen) == {ShiftedWindowAttention}
    assert analyse(aux, X16).training_only == [aux.aux]
    assert protected_layers(aux, X16) == [aux.fc, aux.aux]


def test_groups_through_a_shuffle_or_frozen_attention_are_left_alone_with_the_reason() -> None:
    model = _built("shufflenet")
    shuffle = ChannelMasks(model, X16, protected_layers(model, X16), strict=False)
    # Each block's branch keeps its inner width prunable (1x1 conv out -> depthwise -> 1x1 conv
    # in), as do the stem and the last conv; what reaches a shuffle stays.
    assert {g.root for g in shuffle.groups} == {
        "conv1.0",
        "conv5.0",
        "stage2.0.branch2.3",
        "stage3.0.branch2.3",
        "stage4.0.branch2.3",
    }
    assert len(shuffle.skipped) == 8 and {s.kind for s in shuffle.skipped} == {RESHAPE}
    assert "a reshape (1, 16, 2, 2) -> (1, 2, 8, 2, 2) splits" in shuffle.skipped[2].reason
    model = _built("swin")
    swin = ChannelMasks(model, X16, protected_layers(model, X16), strict=False)
    assert {g.root for g in swin.groups} == {"features.1.0.mlp.0", "features.3.0.mlp.0"}
    assert {s.root for s in swin.skipped} == {"features.1.0.mlp.3", "features.3.0.mlp.3"}
    assert {s.kind for s in swin.skipped} == {UNSUPPORTED}
    assert all("(ShiftedWindowAttention) computes with the weights" in s.reason for s in swin.skipped)


def test_attention_heads_keep_equal_widths() -> None:
    vit = _built("vit")
    masks = ChannelMasks(vit, X16, protected_layers(vit, X16), strict=False)
    (residual,) = [g for g in masks.groups if "conv_proj" in masks.members[g.key]]
    assert (residual.size, residual.ch_groups, residual.positions) == (16, 2, 8)
    masks.remove(masks.ones().index_fill(0, torch.tensor([residual.offset, residual.offset + 3]), 0.0))
    assert vit.hidden_dim == vit.conv_proj.out_channels == 12
    assert [layer.self_attention.head_dim for layer in vit.encoder.layers] == [6, 6]


def test_tracing_in_train_mode_leaves_no_trace() -> None:
    model = _built("aux")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    graph = build_graph(model, X16)
    assert any(node.module is model.aux[0] for node in graph.module2node.values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng) and not model.training


def test_state_dict_metadata_survives_save_and_load(tmp_path) -> None:
    torch.manual_seed(0)
    model = VersionedNet().eval()
    masks = ChannelMasks(model, X16, [model.fc])
    history = masks.remove(masks.ones().index_fill(0, torch.tensor([0, 1]), 0.0))
    path = tmp_path / "versioned.pt"
    save_pruned(path, spec={}, history=history, state_dict=model.state_dict())
    torch.manual_seed(1)
    reloaded, _ = load_pruned(path, lambda spec: VersionedNet(), X16)
    with torch.no_grad():
        assert torch.equal(reloaded(X16), model(X16))
