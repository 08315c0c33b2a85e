"""``autoattack``: the reference AutoAttack code itself, for an exact check of ``autoattack-lite``.

PyPI's ``pyautoattack`` (0.2.0) repackages the official code (fra31/auto-attack): its attack
modules are the official files unchanged; its ``AutoAttack`` front end has its own signature,
``AutoAttack(model, *, attacks=None, device="cpu", eps=0.3, norm="Linf", seed=None,
version="standard")`` and ``run_standard_evaluation(x, y, /, *, batch_size=250)``, returning
``(x_adv, y_adv)``. It is the optional extra ``pip install -e ".[autoattack]"``; without it this
attack raises a one-line error with that hint when it is built.

It runs the reference's standard version (APGD-CE, APGD-T, FAB-T, Square 5,000 queries)
on the PyTorch model (white-box; the suite replays its examples on engines). On a model with
fewer than 10 classes the targeted attacks use ``classes - 1`` targets (the reference would
index past the logits). The reference re-seeds torch's global generator with ``seed``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import torch
from torch import nn

from toolchain.errors import UserError
from toolchain.robustness.attacks.base import ATTACKS, Attack, AttackResult

INSTALL_HINT = "pip install -e '.[autoattack]' (PyPI package pyautoattack, the reference AutoAttack code)"
_NORMS = {"linf": "Linf", "l2": "L2"}
_STANDARD_TARGETS = 9


@ATTACKS.register("autoattack")
class ReferenceAutoAttack(Attack):
    """The reference AutoAttack (standard version) through ``pyautoattack``.

    Args:
        eps: ball radius; norm: ``"linf"`` or ``"l2"``.
        seed: the reference's seed.
        attacks: a subset of the reference's attack names to run in its order (e.g.
            ``("apgd-ce", "apgd-t", "square")``, the ``autoattack-lite`` ensemble) with the
            standard settings; ``None`` runs the standard four.

    Raises:
        UserError: ``pyautoattack`` is not installed, or an unknown attack name.
    """

    name = "autoattack"
    mode = "white-box"
    limited_because = "the reference AutoAttack code classifies whole images"

    def __init__(
        self, *, eps: float, norm: str = "linf", seed: int = 0, attacks: Sequence[str] | None = None
    ) -> None:
        super().__init__(eps=eps, norm=norm, steps=100, seed=seed)
        if importlib.util.find_spec("pyautoattack") is None:
            raise UserError(f"attack 'autoattack' needs the reference AutoAttack: {INSTALL_HINT}")
        standard = ("apgd-ce", "apgd-t", "fab-t", "square")
        unknown = [a for a in attacks or () if a not in standard]
        if unknown:
            raise UserError(f"attack 'autoattack': unknown parts {unknown}; known: {', '.join(standard)}")
        self.attacks = list(attacks) if attacks is not None else list(standard)

    def _run(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
    ) -> AttackResult:
        from pyautoattack import AutoAttack

        with torch.no_grad():
            classes = int(model(x[:1]).shape[1])
        reference = AutoAttack(
            model, eps=self.eps, norm=_NORMS[self.norm], seed=self.seed, device=x.device, version="standard"
        )
        reference.attacks_to_run = list(self.attacks)
        targets = min(_STANDARD_TARGETS, classes - 1)
        reference.apgd_targeted.n_target_classes = targets
        reference.fab.n_target_classes = targets
        x_adv, _ = reference.run_standard_evaluation(x, y, batch_size=len(x))
        return AttackResult(x_adv.detach().to(x.device))
