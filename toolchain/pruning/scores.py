"""Score every prunable channel group of a model with a registered criterion.

Gradient-based criteria need ``param.grad`` filled from the right loss first; this module does
that on the *current* model (so iterative pruning rescores after each step and fine-tune) and
clears the gradients afterwards so a later optimiser step is not polluted by them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from pydantic import BaseModel
from torch import Tensor, nn

from toolchain.errors import UserError
from toolchain.pruning import criteria as _criteria
from toolchain.pruning.depgraph import group_problem
from toolchain.pruning.graph import ROOT_TYPES, build_graph, expand_ignored, group_key
from toolchain.robustness.attacks import pgd as _pgd
from toolchain.robustness.attacks.base import eval_mode
from toolchain.tasks import task_of, to_device

logger = logging.getLogger(__name__)

# Mirrors the recipe's PruneConfig.attack default: a cheap PGD-3 is enough to rank channels.
DEFAULT_ATTACK: dict[str, Any] = {
    "eps": 8 / 255,
    "step_size": 3 / 255,
    "steps": 3,
    "norm": "linf",
    "random_start": True,
}
_ATTACK_KEYS = frozenset({"eps", "step_size", "steps", "norm", "random_start", "restarts"})

ScoreTable = dict[tuple[str, str], Tensor]


def _attack_kwargs(attack: Mapping[str, Any] | BaseModel | None) -> dict[str, Any]:
    if attack is None:
        return dict(DEFAULT_ATTACK)
    if isinstance(attack, BaseModel):  # a validated AttackConfig
        return attack.model_dump()
    unknown = sorted(set(attack) - _ATTACK_KEYS)
    if unknown:
        raise UserError(
            f"unknown attack setting(s) {unknown} for adversarial importance; allowed: {sorted(_ATTACK_KEYS)}"
        )
    return {**DEFAULT_ATTACK, **attack}


def accumulate_gradients(
    model: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]] | None,
    *,
    batches: int,
    loss: str,
    attack: Mapping[str, Any] | BaseModel | None = None,
    seed: int = 0,
) -> int:
    """Fill ``param.grad`` with the mean cross-entropy gradient over ``batches`` batches.

    The model runs in eval mode (BatchNorm statistics must not move, and PGD examples are
    crafted the way evaluation sees the model); its modes are restored afterwards. Existing
    gradients are discarded first.

    Args:
        model: the model to score.
        loader: yields ``(images in [0, 1], labels)``.
        batches: how many batches to use (fewer if the loader runs out).
        loss: ``"clean"`` or ``"adversarial"`` (PGD examples from ``attack``).
        attack: keyword arguments for ``pgd_attack``; defaults to :data:`DEFAULT_ATTACK`.
        seed: seeds the PGD random start, so scores are reproducible.

    Returns:
        The number of batches used.

    Raises:
        UserError: no loader, an empty loader, a bad ``batches`` or unknown attack settings.
    """
    if loader is None:
        raise UserError("this pruning criterion needs gradients: pass importance_loader (images, labels)")
    if batches < 1:
        raise UserError(f"importance_batches must be >= 1, got {batches}")
    if loss not in ("clean", "adversarial"):
        raise ValueError(f"loss must be 'clean' or 'adversarial', got {loss!r}")
    attack_kwargs = _attack_kwargs(attack) if loss == "adversarial" else {}
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    model.zero_grad(set_to_none=True)
    task = task_of(model)  # per-pixel loss for segmentation models
    used = 0
    with eval_mode(model), torch.enable_grad(), all_trainable(model):
        for batch in loader:
            if used >= batches:
                break
            x, y = batch[0].to(device), to_device(batch[1], device)
            if loss == "adversarial":
                x = _pgd.pgd_attack(model, x, y, generator=generator, **attack_kwargs)
            # Divide so the gradient is the mean over batches, whatever their count.
            (task.loss(model(x), y) / batches).backward()
            used += 1
    if used == 0:
        raise UserError("importance_loader yielded no batches; it must yield (images, labels)")
    return used


@contextlib.contextmanager
def all_trainable(model: nn.Module) -> Iterator[None]:
    """Parameters the user froze (``requires_grad=False``) get gradients too while channels are
    scored, so their layers are ranked like every other (and pruned like them); the flags are
    restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def compute_scores(
    model: nn.Module,
    example_inputs: Any,
    criterion: str,
    *,
    ignored_layers: Sequence[nn.Module] = (),
    loader: Iterable[tuple[Tensor, Tensor]] | None = None,
    batches: int = 4,
    attack: Mapping[str, Any] | BaseModel | None = None,
) -> ScoreTable:
    """Score every prunable channel group of ``model`` with ``criterion``.

    Args:
        model: the model as it is now (scores are only valid for its current channels).
        example_inputs: inputs used to trace the dependency graph.
        criterion: a name registered in ``CRITERIA``.
        ignored_layers: layers whose output channels must not be pruned (the head).
        loader, batches, attack: gradient source for gradient-based criteria.

    Returns:
        ``{(root layer name, pruning function name): scores}``, one float score per output
        channel of the root layer.

    Raises:
        UnknownNameError: ``criterion`` is not registered (the message lists the names).
        UserError: a gradient-based criterion without a usable loader.
    """
    info = _criteria.CRITERIA.get(criterion)
    if info.needs_gradients:
        used = accumulate_gradients(model, loader, batches=batches, loss=info.loss or "clean", attack=attack)
        logger.info("%s: gradients from %d %s batch(es)", criterion, used, info.loss)
    try:
        importance = info.factory()
        graph = build_graph(model, example_inputs)
        names = {module: name for name, module in model.named_modules()}
        table: ScoreTable = {}
        groups = graph.get_all_groups(
            ignored_layers=expand_ignored(ignored_layers), root_module_types=ROOT_TYPES
        )
        for group in groups:
            if group_problem(graph, group, names):
                continue  # left alone by the masks (and some crash torch-pruning's importance)
            scores = importance(group)
            if scores is not None:
                table[group_key(group, names)] = scores.detach().float().cpu()
        return table
    finally:
        if info.needs_gradients:
            model.zero_grad(set_to_none=True)
