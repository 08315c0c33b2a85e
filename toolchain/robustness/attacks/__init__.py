"""Adversarial attacks in [0, 1] pixel space, one per file, behind the ``ATTACKS`` registry.

White-box: ``fgsm``, ``pgd`` (L-inf, L2), ``apgd`` (APGD-CE, L-inf, L2), ``apgd-t`` (targeted
DLR, L-inf, L2), ``segpgd`` (segmentation), ``tog-vanishing``, ``tog-fabrication``,
``tog-mislabeling`` (detection). Black-box: ``square`` (L-inf). Ensembles:
``autoattack-lite`` (APGD-CE, APGD-T, Square with AutoAttack's standard settings) and
``autoattack`` (the reference code, optional extra). Transfer (white-box examples replayed on
an engine) is :func:`transfer_attack`. Each attack declares the tasks it is defined for;
:func:`build_attack` builds one for a task or refuses it in one line.
"""

from __future__ import annotations

from toolchain.robustness.attacks.apgd import APGD
from toolchain.robustness.attacks.apgd_t import APGDT
from toolchain.robustness.attacks.base import (
    ATTACKS,
    Attack,
    AttackResult,
    Classifier,
    parse_eps,
    predict,
    robust_accuracy,
)
from toolchain.robustness.attacks.ensemble import AutoAttackLite
from toolchain.robustness.attacks.fgsm import FGSM
from toolchain.robustness.attacks.pgd import PGD, pgd_attack
from toolchain.robustness.attacks.reference import ReferenceAutoAttack
from toolchain.robustness.attacks.segpgd import SegPGD
from toolchain.robustness.attacks.square import Square
from toolchain.robustness.attacks.tog import TOGFabrication, TOGMislabeling, TOGVanishing
from toolchain.robustness.attacks.transfer import TRANSFER_MODE, TransferResult, transfer_attack

__all__ = [
    "APGD",
    "APGDT",
    "ATTACKS",
    "FGSM",
    "PGD",
    "TRANSFER_MODE",
    "Attack",
    "AttackResult",
    "AutoAttackLite",
    "Classifier",
    "ReferenceAutoAttack",
    "SegPGD",
    "Square",
    "TOGFabrication",
    "TOGMislabeling",
    "TOGVanishing",
    "TransferResult",
    "build_attack",
    "parse_eps",
    "pgd_attack",
    "predict",
    "robust_accuracy",
    "transfer_attack",
]


def build_attack(
    name: str,
    *,
    eps: float | str,
    norm: str = "linf",
    steps: int | None = None,
    step_size: float | None = None,
    restarts: int | None = None,
    queries: int | None = None,
    targets: int | None = None,
    seed: int = 0,
    task: str | None = None,
) -> Attack:
    """Build the attack registered as ``name`` from the recipe's common options, for ``task``
    (None: scoring on the attacked model's own task).

    ``eps`` may be a number or a string such as ``"8/255"`` (see :func:`parse_eps`).
    Each attack uses the options that apply to it: ``steps``/``step_size`` for PGD,
    ``steps``/``restarts`` for APGD, ``steps``/``targets`` for APGD-T, ``queries`` for
    Square, all three for ``autoattack-lite``; FGSM uses only ``eps``. ``None`` keeps the
    attack's own default.

    Raises:
        UnknownNameError: ``name`` is not registered (the message lists the known names).
        UserError: an invalid combination, e.g. ``square`` or ``fgsm`` with ``norm="l2"``,
            a negative ``eps`` or ``steps``, ``queries < 1``, or an attack not defined for
            ``task`` (the message names the ones that are).
    """
    cls = ATTACKS.get(name)
    attack = cls.from_options(
        eps=parse_eps(eps),
        norm=norm,
        steps=steps,
        step_size=step_size,
        restarts=restarts,
        queries=queries,
        targets=targets,
        seed=seed,
    )
    return attack.for_task(task) if task is not None else attack
