"""SegPGD (Gu, Zhao, Tresp and Torr, "SegPGD: An Effective and Efficient Adversarial Attack for
Evaluating and Boosting Segmentation Robustness", ECCV 2022), L-inf and L2, in [0, 1] pixels.

Plain PGD on the mean per-pixel cross-entropy spends most of its gradient on pixels that are
already wrong (their loss is large and keeps growing). SegPGD splits the pixels at every step
into those the model still gets right (``P_T``) and those it gets wrong (``P_F``) and ascends

    L(t) = ((1 - lambda(t)) * sum_{P_T} CE + lambda(t) * sum_{P_F} CE) / (H * W),
    lambda(t) = (t - 1) / (2 T),  t = 1..T,

so early steps attack the correct pixels only and the weight moves towards an even split as
the attack goes on. Our code follows the paper's equations (the official code was not used);
deviations: ignored pixels (label 255) count in neither set, and the sum is divided by the
labelled pixels rather than ``H * W`` (for an L-inf sign step the scale does not matter).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from toolchain.robustness.attacks.base import input_gradients_only
from toolchain.robustness.attacks.pgd import _l2_normalise, _project, _random_start
from toolchain.tasks.segmentation import IGNORE_INDEX


def segpgd_weights(logits: torch.Tensor, y: torch.Tensor, step: int, steps: int) -> torch.Tensor:
    """Per-pixel weights of step ``step`` (0-based) of ``steps``: ``1 - lambda`` on correctly
    classified pixels, ``lambda`` on wrong ones, 0 on ignored ones."""
    lam = step / (2 * max(steps, 1))
    right = logits.argmax(1) == y
    weights = torch.where(right, 1.0 - lam, lam)
    return weights * (y != IGNORE_INDEX)


def segpgd_attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    norm: str = "linf",
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Untargeted SegPGD against a segmentation model (see the module docstring).

    Args:
        model: differentiable, [0, 1] pixels to ``N x K x H x W`` logits (train or eval mode
            is the caller's choice); its parameter gradients are left untouched.
        x: clean batch in [0, 1]; y: ``N x H x W`` labels (255 = ignore).
        eps, step_size, steps, norm, random_start, generator: as :func:`pgd_attack`.

    Returns:
        The adversarial batch, detached, in [0, 1].
    """
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    x = x.detach()
    if eps <= 0:
        return x.clone()
    labelled = (y != IGNORE_INDEX).sum().clamp_min(1)
    delta = _random_start(x, eps, norm, generator) if random_start else torch.zeros_like(x)
    delta = ((x + delta).clamp(0, 1) - x).detach()
    with input_gradients_only(model):
        for step in range(steps):
            delta.requires_grad_(True)
            logits = model(x + delta)
            per_pixel = F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="none")
            weights = segpgd_weights(logits.detach(), y, step, steps)
            loss = (weights * per_pixel).sum() / labelled
            (grad,) = torch.autograd.grad(loss, delta)
            move = grad.sign() if norm == "linf" else _l2_normalise(grad)
            delta = _project(delta.detach() + step_size * move, eps, norm)
            delta = ((x + delta).clamp(0, 1) - x).detach()
    return (x + delta).detach()
