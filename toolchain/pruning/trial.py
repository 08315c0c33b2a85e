"""Before any training: does the model still run once channels are removed?

torch-pruning follows the autograd graph, so it shrinks every layer it can see; what it
cannot see breaks the pruned model: a ``forward`` that writes a channel count into a
``view``/``reshape``, or an op its dependency graph does not handle. Such a model would train
for hours and then fail in the prune stage with a shape error. So the prune stage's
preflight removes one channel from every prunable group of a copy and runs one forward
pass; only when that fails, each group is tried alone to name the culprits, and the error
suggests ``prune.ignored_layers`` for them (their output channels then stay).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from toolchain.errors import UserError
from toolchain.pruning.graph import run_forward
from toolchain.pruning.masks import ChannelMasks


def check_removal(model: nn.Module, example_inputs: Tensor, ignored: Sequence[nn.Module]) -> None:
    """Remove one channel per prunable group on a copy of ``model`` and run a forward pass.

    Args:
        model: the dense model (not modified).
        example_inputs: one input batch of the right shape.
        ignored: layers whose output channels stay (the head, ``prune.ignored_layers``).

    Raises:
        UserError: the copy no longer runs; names the groups whose removal breaks it and
            suggests ``prune.ignored_layers``.
    """
    names = {id(m): name for name, m in model.named_modules()}
    kept = [names[id(m)] for m in ignored]
    roots = [g.root for g in ChannelMasks(model, example_inputs, ignored, strict=False).groups]
    if _failure(model, example_inputs, kept, roots) is None:
        return
    culprits = {root: why for root in roots if (why := _failure(model, example_inputs, kept, [root]))}
    if not culprits:  # each group alone is fine, only together they break: name them all
        culprits = {root: _failure(model, example_inputs, kept, roots) or "" for root in roots}
    first, why = next(iter(culprits.items()))
    layers = ", ".join(repr(r) for r in culprits)
    raise UserError(
        f"the model no longer runs once output channels of {layers} are removed ({why}): its forward "
        f"hard-codes their count or uses an op torch-pruning cannot follow; add them to "
        f"prune.ignored_layers (e.g. prune.ignored_layers: [{first}]) so they keep their channels"
    )


def _failure(model: nn.Module, example_inputs: Tensor, kept: list[str], roots: list[str]) -> str | None:
    """Why a copy with one channel removed from each group in ``roots`` fails (None: it runs)."""
    trial = copy.deepcopy(model).eval()
    modules = dict(trial.named_modules())
    masks = ChannelMasks(trial, example_inputs, [modules[n] for n in kept], strict=False)
    mask = masks.ones()
    for group in masks.groups:
        if group.root in roots and group.positions > group.floor:
            mask[group.offset] = 0.0
    try:
        masks.remove(mask)
        with torch.no_grad():
            run_forward(trial, example_inputs)
    except Exception as exc:  # any failure of the user's forward is the finding itself
        lines = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {lines[0] if lines else ''}"
    return None
