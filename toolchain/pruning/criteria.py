"""Channel importance criteria: torch-pruning ``Importance`` objects in a small registry.

An importance is called on a dependency group (every layer coupled to one set of channels) and
returns one score per channel of the group's root layer; a low score means "prune first".
Scores of coupled layers are added at the root channel they belong to, via each group item's
``root_idxs`` (a concatenation or a residual addition couples channels with other indices).

Gradient-based criteria read ``param.grad``: the caller fills it first (see
:func:`toolchain.pruning.scores.accumulate_gradients`), as the registry entry declares.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch_pruning as tp
from torch import nn

from toolchain.registry import Registry

Loss = Literal["clean", "adversarial"]


@dataclass(frozen=True)
class CriterionInfo:
    """A registered criterion.

    Attributes:
        factory: builds a fresh ``tp.importance.Importance``.
        needs_gradients: whether parameter gradients must be accumulated before scoring.
        loss: which cross-entropy the gradients come from: ``"clean"`` images or
            ``"adversarial"`` (PGD) images; ``None`` for gradient-free criteria.
        description: one line for ``--help`` style listings.
    """

    factory: Callable[[], tp.importance.Importance]
    needs_gradients: bool
    loss: Loss | None
    description: str


CRITERIA: Registry[CriterionInfo] = Registry("pruning criterion")


def _plain(idxs: Any) -> list[int]:
    return [int(getattr(i, "idx", i)) for i in idxs]


def _abs_product(param: torch.Tensor | None) -> torch.Tensor | None:
    """``|w * dL/dw|`` elementwise, or None when the parameter has no gradient."""
    if param is None or param.grad is None:
        return None
    return (param.detach() * param.grad.detach()).abs()


def _conv_in_scores(layer: nn.modules.conv._ConvNd, prod: torch.Tensor) -> torch.Tensor:
    """Per input channel scores of a (possibly grouped) conv from ``|w * g|``.

    The weight is ``(out, in / groups, *k)``: input channel ``c`` lives in group
    ``c // (in / groups)`` at column ``c % (in / groups)`` and only feeds that group's outputs.
    """
    if layer.transposed:
        # (in, out / groups, *k): input channels are the first dimension already.
        return prod.flatten(1).sum(1)
    groups = layer.groups
    if groups == 1:
        return prod.transpose(0, 1).flatten(1).sum(1)
    per_group = prod.reshape(groups, prod.shape[0] // groups, prod.shape[1], -1)
    return per_group.sum(dim=(1, 3)).flatten()


def taylor_layer_scores(layer: nn.Module, pruning_fn: Callable[..., Any]) -> torch.Tensor | None:
    """First-order Taylor scores ``sum |w * dL/dw|`` for every channel ``pruning_fn`` acts on.

    Args:
        layer: a Conv, Linear or BatchNorm layer whose parameters hold gradients.
        pruning_fn: the torch-pruning function of the dependency (out- or in-channel pruning).

    Returns:
        One score per channel of the pruned dimension, or None for layers without
        parameters/gradients (they add nothing to the group's score).
    """
    name = getattr(pruning_fn, "__name__", "")
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
        parts = [p for p in (_abs_product(layer.weight), _abs_product(layer.bias)) if p is not None]
        return torch.stack(parts).sum(0) if parts else None
    if not isinstance(layer, (nn.modules.conv._ConvNd, nn.Linear)):
        return None
    prod = _abs_product(layer.weight)
    if prod is None:
        return None
    depthwise = isinstance(layer, nn.modules.conv._ConvNd) and layer.groups == layer.out_channels > 1
    if name == "prune_out_channels" or depthwise:
        # A depthwise conv's input channel is its output channel: same weights either way.
        if isinstance(layer, nn.modules.conv._ConvNd) and layer.transposed:
            prod = prod.transpose(0, 1)
        scores = prod.flatten(1).sum(1)
        bias = _abs_product(layer.bias)
        return scores + bias if bias is not None else scores
    if name == "prune_in_channels":
        if isinstance(layer, nn.Linear):
            return prod.sum(0)
        return _conv_in_scores(layer, prod)
    return None


class TaylorImportance(tp.importance.Importance):
    """First-order Taylor importance (Molchanov et al. 2019), summed over coupled layers.

    A channel's score estimates how much the loss changes when it is removed:
    ``sum |w * dL/dw|`` over its output weights and bias, the input weights of the layers it
    feeds, and its BatchNorm affine parameters. Whichever loss produced ``param.grad`` (clean
    or adversarial cross-entropy) decides what "matters" means.
    """

    @torch.no_grad()
    def __call__(self, group: Any) -> torch.Tensor | None:
        n_root = len(group[0].idxs)
        total = torch.zeros(n_root, dtype=torch.float64)
        used = False
        for item in group:
            if item.root_idxs is None or any(r is None for r in item.root_idxs):
                continue
            scores = taylor_layer_scores(item.dep.target.module, item.dep.handler)
            if scores is None:
                continue
            local = scores.to("cpu", torch.float64)[_plain(item.idxs)]
            total.scatter_add_(0, torch.tensor(_plain(item.root_idxs)), local)
            used = True
        return total.float() if used else None


class SeededRandomImportance(tp.importance.Importance):
    """Uniform random scores from a fixed seed: the baseline every criterion must beat."""

    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def __call__(self, group: Any) -> torch.Tensor:
        return torch.rand(len(group[0].idxs), generator=self.generator)


CRITERIA.register("magnitude")(
    CriterionInfo(
        factory=lambda: tp.importance.GroupMagnitudeImportance(p=2),
        needs_gradients=False,
        loss=None,
        description="L2 norm of each channel's weights, averaged over coupled layers",
    )
)
CRITERIA.register("taylor")(
    CriterionInfo(
        factory=TaylorImportance,
        needs_gradients=True,
        loss="clean",
        description="first-order Taylor |w * dL/dw| on the clean cross-entropy",
    )
)
CRITERIA.register("adv-taylor")(
    CriterionInfo(
        factory=TaylorImportance,
        needs_gradients=True,
        loss="adversarial",
        description="first-order Taylor |w * dL/dw| on the cross-entropy of PGD examples",
    )
)
CRITERIA.register("random")(
    CriterionInfo(
        factory=SeededRandomImportance,
        needs_gradients=False,
        loss=None,
        description="seeded uniform random scores (baseline)",
    )
)
