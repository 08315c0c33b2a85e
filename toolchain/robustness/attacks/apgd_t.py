"""APGD-T (Croce & Hein, ICML 2020): APGD on the targeted DLR loss, one run per target class.

Written from the paper and the facts of its official code (fra31/auto-attack,
``APGDAttack_targeted``):

* loss ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)`` with ``z`` the logits,
  ``pi`` their descending order and ``t`` the target class. It is invariant to shifting and
  rescaling the logits, so it is not fooled by a model that inflates them;
* targets: the ``targets`` most likely non-true classes on the clean image (AutoAttack
  standard: 9), tried in that order, each with a full APGD run (100 iterations, the same
  checkpoint schedule as APGD-CE) on the images not fooled yet;
* success is any misclassification, not only reaching the target; an image no target fools
  returns its highest cross-entropy point over every target and restart (see ``apgd``).

The DLR denominator needs a fourth logit, so the model must have at least 4 classes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from toolchain.errors import UserError
from toolchain.robustness.attacks.apgd import APGD, Loss
from toolchain.robustness.attacks.base import ATTACKS, AttackResult, input_gradients_only


def dlr_targeted(target: torch.Tensor) -> Loss:
    """The targeted DLR loss towards ``target`` (one class per sample), as a ``(logits, y)`` loss."""

    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ordered = logits.sort(dim=1, descending=True).values
        true = logits.gather(1, y.view(-1, 1)).squeeze(1)
        towards = logits.gather(1, target.view(-1, 1)).squeeze(1)
        scale = ordered[:, 0] - 0.5 * (ordered[:, 2] + ordered[:, 3]) + 1e-12
        return -(true - towards) / scale

    return loss


@ATTACKS.register("apgd-t")
class APGDT(APGD):
    """Targeted APGD on the DLR loss, L-inf or L2.

    Args:
        eps: ball radius; norm: ``"linf"`` or ``"l2"``; steps: iterations per target.
        targets: how many of the most likely wrong classes to target (capped at classes - 1).
        restarts: random restarts per target (AutoAttack standard: 1).
        seed: seeds the random starts; re-applied at every call.

    Raises:
        UserError: ``targets < 1``; at run time, a model with fewer than 4 classes.
    """

    name = "apgd-t"
    min_classes = 4
    min_classes_why = "the DLR loss uses the 4th largest logit"
    tasks = frozenset({"classification"})
    limited_because = "APGD-T targets one class per image"

    def __init__(
        self,
        *,
        eps: float,
        norm: str = "linf",
        steps: int = 100,
        targets: int = 9,
        restarts: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__(eps=eps, norm=norm, steps=steps, restarts=restarts, seed=seed)
        if targets < 1:
            raise UserError(f"attack 'apgd-t': targets must be >= 1, got {targets}")
        self.targets = targets

    def _run(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
    ) -> AttackResult:
        with torch.no_grad():
            logits = model(x)
        classes = logits.shape[1]
        if classes < 4:
            raise UserError(
                f"attack 'apgd-t' needs a model with at least 4 classes (the DLR loss uses the "
                f"4th largest logit), this one has {classes}; use 'apgd' instead"
            )
        # Most likely classes first; the true class is first for these correctly classified images.
        ranked = logits.argsort(dim=1, descending=True)
        best = x.clone()
        todo = torch.ones(len(x), dtype=torch.bool, device=x.device)
        best_loss = torch.full((len(x),), -math.inf, device=x.device)
        with input_gradients_only(model):
            for rank in range(1, min(self.targets, classes - 1) + 1):

                def towards(idx: torch.Tensor, r: int = rank) -> Loss:
                    return dlr_targeted(ranked[idx, r])

                self._restarts(model, x, y, towards, best, todo, best_loss, generator)
        return AttackResult(best)
