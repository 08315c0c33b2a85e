"""Transfer: adversarial examples crafted white-box on the PyTorch model, replayed elsewhere.

An exported engine has no gradients, so white-box attacks are made once on the model it came
from and their examples are fed to each engine. The results are reported with mode
``"transfer"``; comparing them with the white-box accuracy of the model itself shows whether
export (quantisation, fused kernels) changed the model's decisions near its boundary.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from toolchain.errors import UserError
from toolchain.robustness.attacks.base import Attack, Classifier, robust_accuracy

__all__ = ["TRANSFER_MODE", "TransferResult", "transfer_attack"]

TRANSFER_MODE = "transfer"


@dataclass(frozen=True)
class TransferResult:
    """Accuracy of the source model (white-box) and of each target on the same examples.

    Attributes:
        x_adv: the examples crafted on the source model.
        white_box_accuracy: accuracy of the source model on ``x_adv``.
        accuracy: target name → accuracy on ``x_adv`` (mode ``"transfer"``).
    """

    x_adv: torch.Tensor
    white_box_accuracy: float
    accuracy: dict[str, float]


def transfer_attack(
    attack: Attack,
    model: nn.Module,
    targets: Mapping[str, Classifier],
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int | None = None,
) -> TransferResult:
    """Craft ``attack`` on ``model`` once, then measure every target on the examples.

    Args:
        attack: a white-box attack.
        model: the differentiable PyTorch model the targets were exported from (or a surrogate).
        targets: name → runner (or module) to replay the examples on.
        x: clean batch in [0, 1]; y: integer labels.
        batch_size: chunk size when querying the targets (None: one call).

    Returns:
        The examples, the source model's accuracy on them and each target's.

    Raises:
        UserError: ``attack`` is not white-box, or the batch is invalid.
    """
    if attack.mode != "white-box":
        raise UserError(f"transfer needs a white-box attack to craft examples, got {attack.name!r}")
    x_adv = attack(model, x, y).x_adv
    accuracy = {name: robust_accuracy(target, x_adv, y, batch_size) for name, target in targets.items()}
    return TransferResult(x_adv, robust_accuracy(model, x_adv, y, batch_size), accuracy)
