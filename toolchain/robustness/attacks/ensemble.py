"""``autoattack-lite``: the AutoAttack standard ensemble without FAB-T, with its settings.

AutoAttack standard (Croce & Hein 2020) runs APGD-CE (100 iterations, 1 restart), APGD-T
(100 iterations, 9 target classes), FAB-T and Square (5,000 queries, ``p_init = 0.8``, the
10,000-query ``p`` schedule not rescaled), each on the images the previous ones did not fool;
an image is robust only if it survives all of them. Leaving out FAB-T usually costs well under
half a point of robust accuracy on adversarially trained models (METHODS.md); the reference
itself is the optional ``autoattack`` attack (``toolchain.robustness.attacks.reference``).

In the validation suite the ensemble is expanded into its parts, so each is reported on its
own and scored per runtime (APGD-CE and APGD-T crafted on PyTorch and replayed on an engine,
Square run against each runtime), and the per-image worst case over them is the evaluation's
``robust_accuracy`` at that budget. Called directly on a PyTorch model it runs the parts in
sequence and returns, per image, the first adversarial example found.

With ``norm="l2"`` Square is left out (ours is L-inf only), so the ensemble is APGD-CE and
APGD-T.
"""

from __future__ import annotations

import torch
from torch import nn

from toolchain.robustness.attacks.apgd import APGD
from toolchain.robustness.attacks.apgd_t import APGDT
from toolchain.robustness.attacks.base import ATTACKS, Attack, AttackResult, predict
from toolchain.robustness.attacks.square import Square


@ATTACKS.register("autoattack-lite")
class AutoAttackLite(Attack):
    """APGD-CE + APGD-T + Square with AutoAttack's standard settings.

    Args:
        eps: ball radius; norm: ``"linf"`` (all three) or ``"l2"`` (no Square).
        steps: APGD-CE and APGD-T iterations (standard 100); lower only for quick checks.
        targets: APGD-T target classes (standard 9, capped at classes - 1).
        restarts: APGD-CE restarts, and APGD-T restarts per target (standard 1).
        queries: Square's query budget (standard 5,000).
        seed: seeds every part.
    """

    name = "autoattack-lite"
    mode = "white-box"
    limited_because = "AutoAttack's targeted and black-box parts are defined per image"

    def __init__(
        self,
        *,
        eps: float,
        norm: str = "linf",
        steps: int = 100,
        targets: int = 9,
        restarts: int = 1,
        queries: int = 5000,
        seed: int = 0,
    ) -> None:
        super().__init__(eps=eps, norm=norm, steps=steps, seed=seed)
        self.parts: list[Attack] = [
            APGD(eps=eps, norm=norm, steps=steps, restarts=restarts, seed=seed),
            APGDT(eps=eps, norm=norm, steps=steps, targets=targets, restarts=restarts, seed=seed),
        ]
        if norm == "linf":
            self.parts.append(Square(eps=eps, queries=queries, p_init=0.8, rescale_schedule=False, seed=seed))

    def components(self) -> list[Attack]:
        return list(self.parts)

    def _run(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
    ) -> AttackResult:
        x_adv = x.clone()
        todo = torch.ones(len(x), dtype=torch.bool, device=x.device)
        for part in self.parts:
            idx = todo.nonzero().squeeze(1)
            if len(idx) == 0:
                break
            found = part(model, x[idx], y[idx]).x_adv
            fooled = predict(model, found).argmax(1) != y[idx]
            x_adv[idx[fooled]] = found[fooled]
            todo[idx[fooled]] = False
        return AttackResult(x_adv)
