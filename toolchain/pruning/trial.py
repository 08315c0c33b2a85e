"""Before any training: does the model still run once channels are removed?

torch-pruning follows the autograd graph, so it shrinks every layer it can see; what it
cannot see breaks the pruned model: a ``forward`` that writes a channel count into a
``view``/``reshape``, or an op its dependency graph does not handle. Such a model would train
for hours and then fail in the prune stage with a shape error. So the prune stage's
preflight removes every prunable group of a copy down to its floor (``max_layer_pruning``) and
runs one eval-mode and one train-mode forward pass; only when that fails, each group is tried
alone (one channel removed) to name the culprits, and the error suggests
``prune.ignored_layers`` for them (their output channels then stay).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from torch import Tensor, nn

from toolchain.errors import UserError
from toolchain.pruning.masks import ChannelMasks
from toolchain.pruning.prunability import check_forward


def check_removal(
    model: nn.Module, example_inputs: Tensor, ignored: Sequence[nn.Module], *, max_layer_pruning: float = 0.9
) -> None:
    """Remove every prunable group of a copy of ``model`` down to its floor and run it in eval
    and train mode.

    Args:
        model: the dense model (not modified).
        example_inputs: one input batch of the right shape.
        ignored: layers whose output channels stay (the head, ``prune.ignored_layers``).
        max_layer_pruning: the largest fraction of a group pruning may remove (its floor).

    Raises:
        UserError: the copy no longer runs; names the groups whose removal breaks it and
            suggests ``prune.ignored_layers``.
    """
    names = {id(m): name for name, m in model.named_modules()}
    kept = [names[id(m)] for m in ignored]
    roots = [g.root for g in ChannelMasks(model, example_inputs, ignored, strict=False).groups]
    whole = _failure(model, example_inputs, kept, roots, to_floor=max_layer_pruning)
    if whole is None:
        return
    culprits = {root: why for root in roots if (why := _failure(model, example_inputs, kept, [root]))}
    if not culprits:  # each group alone is fine, only together they break: name them all
        culprits = dict.fromkeys(roots, whole)
    first, why = next(iter(culprits.items()))
    others = len(culprits) - 1
    more = f" (and {others} more group(s); robustprune inspect lists them)" if others else ""
    raise UserError(
        f"the model no longer runs once output channels of {first!r}{more} are removed ({why}): its "
        f"forward hard-codes their count or uses an op torch-pruning cannot follow; add them to "
        f"prune.ignored_layers (e.g. prune.ignored_layers: [{first}]) so they keep their channels"
    )


def _failure(
    model: nn.Module,
    example_inputs: Tensor,
    kept: list[str],
    roots: list[str],
    *,
    to_floor: float | None = None,
) -> str | None:
    """Why a copy with channels removed from each group in ``roots`` fails (None: it runs):
    one channel each, or with ``to_floor`` (a ``max_layer_pruning``) every group at its floor."""
    trial = copy.deepcopy(model).eval()
    modules = dict(trial.named_modules())
    masks = ChannelMasks(
        trial,
        example_inputs,
        [modules[n] for n in kept],
        strict=False,
        max_layer_pruning=0.9 if to_floor is None else to_floor,
    )
    mask = masks.ones()
    for group in masks.groups:
        if group.root in roots and group.positions > group.floor:
            removed = group.positions - group.floor if to_floor is not None else 1
            mask[group.offset : group.offset + removed] = 0.0
    try:
        masks.remove(mask)
        check_forward(trial, example_inputs, what="the pruned copy")
    except UserError as exc:  # check_forward's one line names the mode and the module
        return str(exc)
    except Exception as exc:  # any failure of the removal itself is the finding too
        lines = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {lines[0] if lines else ''}"
    return None
