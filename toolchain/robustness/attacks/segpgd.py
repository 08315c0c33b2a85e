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

from toolchain.errors import UserError
from toolchain.robustness.attacks.base import ATTACKS, Attack, AttackResult, input_gradients_only
from toolchain.robustness.attacks.pgd import _l2_normalise, _project, _random_start
from toolchain.tasks.seg_metrics import IGNORE_INDEX


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


@ATTACKS.register("segpgd")
class SegPGD(Attack):
    """SegPGD on a segmentation model (see the module docstring), L-inf or L2.

    Args:
        eps: ball radius; norm: ``"linf"`` or ``"l2"``; steps: iterations (default 20).
        step_size: step length; default ``2.5 * eps / steps``, as for PGD.
        seed: seeds the random start; re-applied at every call.
    """

    name = "segpgd"
    mode = "white-box"
    tasks = frozenset({"segmentation"})
    limited_because = "SegPGD weighs the correct and wrong pixels of a per-pixel prediction"

    def __init__(
        self,
        *,
        eps: float,
        norm: str = "linf",
        steps: int = 20,
        step_size: float | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(eps=eps, norm=norm, steps=steps, seed=seed)
        if step_size is not None and step_size <= 0:
            raise UserError(f"attack 'segpgd': step_size must be > 0, got {step_size}")
        self.step_size = step_size if step_size is not None else 2.5 * self.eps / max(self.steps, 1)

    def _run(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
    ) -> AttackResult:
        x_adv = segpgd_attack(
            model,
            x,
            y,
            eps=self.eps,
            step_size=self.step_size,
            steps=self.steps,
            norm=self.norm,
            generator=generator,
        )
        return AttackResult(x_adv)
