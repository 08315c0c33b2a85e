"""Evaluation sanity flags, in the spirit of AutoAttack's checks.

A flag does not fail a run: it says that an accuracy under attack is probably too optimistic
(gradient masking, randomness) or that an engine is not the model it came from. Each check is
a small function on tensors or floats that returns the flag's name or ``None``; ``FLAGS``
describes every name (the docs list them under "Sanity flags").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from exporters.outputs import Outputs, as_tuple, map_outputs
from toolchain.errors import UserError
from toolchain.robustness.attacks.base import Classifier, predict
from toolchain.tasks import task_of

__all__ = [
    "DEFAULT_MIN_AGREEMENT",
    "FLAGS",
    "check_black_box_stronger",
    "check_engine_agreement",
    "check_probabilities",
    "check_randomised_outputs",
    "check_transfer_stronger",
    "check_zero_gradients",
    "output_flags",
    "paired_difference",
]

PROBABILITIES = "probabilities-not-logits"
ZERO_GRADIENTS = "zero-gradients"
RANDOMISED = "randomised-outputs"
BLACK_BOX_STRONGER = "black-box-stronger-than-white-box"
TRANSFER_STRONGER = "transfer-stronger-than-white-box"
ENGINE_DISAGREES = "engine-disagrees-with-torch"

FLAGS: dict[str, str] = {
    PROBABILITIES: "outputs lie in [0, 1] and each row sums to 1: the model applies softmax, "
    "which saturates gradients and weakens white-box attacks; return logits",
    ZERO_GRADIENTS: "the loss gradient w.r.t. the input is exactly zero for at least 10% of a batch "
    "(non-differentiable or saturated layers): white-box accuracy is not trustworthy",
    RANDOMISED: "the same input gives different outputs on two calls (dropout or noise at inference): "
    "attacks see a moving target; evaluate in eval mode or use expectation over transformation",
    BLACK_BOX_STRONGER: "the black-box attack (Square) leaves lower accuracy than the white-box ones at "
    "the same norm and eps on the same images, by more than two standard errors of the paired "
    "difference: suspected gradient masking",
    TRANSFER_STRONGER: "examples crafted on another model fool this one more than white-box attacks on "
    "itself at the same budget on the same images, beyond two standard errors: suspected gradient masking",
    ENGINE_DISAGREES: "the engine's top-1 predictions on clean inputs disagree with PyTorch's more than "
    "allowed for its precision (fp32: any; fp16/int8: over 1%)",
}

#: Minimum clean top-1 agreement with PyTorch, per engine precision. fp32 engines compute the
#: same function up to rounding, so any flip is suspicious; reduced precision may flip near-ties.
DEFAULT_MIN_AGREEMENT: dict[str, float] = {"fp32": 1.0, "fp16": 0.99, "int8": 0.99}


def check_probabilities(logits: torch.Tensor, atol: float = 1e-3) -> str | None:
    """Flag outputs that look like probabilities: all in [0, 1], rows summing to 1 ± ``atol``."""
    out = logits.detach().float()
    if out.numel() == 0 or out.dim() != 2:
        return None
    in_unit = bool(((out >= 0) & (out <= 1)).all())
    sums_to_one = bool(((out.sum(1) - 1).abs() <= atol).all())
    return PROBABILITIES if in_unit and sums_to_one else None


def first_batch_flags(
    model: nn.Module | None,
    runners: Mapping[str, Any],
    x: torch.Tensor,
    y: Any,
    logits: Mapping[str, Outputs],
    flags: dict[str, set[str]],
) -> None:
    """The checks a suite runs on its first batch: each runner's outputs, and the PyTorch
    model's input gradients (masked gradients weaken white-box and transfer attacks on every
    runner alike, so that flag goes to all of them)."""
    for name, runner in runners.items():
        flags[name].update(output_flags(runner, x, logits[name]))
    grad_flag = check_zero_gradients(model, x, y) if model is not None else None
    for name in runners:
        flags[name].update([grad_flag] if grad_flag else [])


def check_zero_gradients(
    model: nn.Module | None, x: torch.Tensor, y: Any, min_share: float = 0.1
) -> str | None:
    """Flag when the input gradient of the cross-entropy is exactly zero for many samples.

    Exact zeros come from non-differentiable steps (rounding, argmax, thresholds) or from
    saturation; a healthy float32 model gives tiny but non-zero gradients even to confidently
    classified samples, so exact zeros on a share of ``min_share`` (10%) or more of the batch
    are flagged. AutoAttack flags any zero; the share tolerates the odd sample whose logit
    margin is so large (about 100) that its softmax underflows.

    Args:
        model: the PyTorch model (``None``, e.g. for a bare engine, gives ``None``).
        x: clean batch in [0, 1]; y: integer labels.
        min_share: share of samples with all-zero gradients that raises the flag.
    """
    if model is None or len(x) == 0:
        return None
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        x_in = x.detach().clone().requires_grad_(True)
        # Summed so each sample's gradient is its own loss's, not divided by the batch size.
        loss = task_of(model).loss(model(x_in), y, reduction="sum")
        if not loss.requires_grad:  # the graph is cut (e.g. .detach() inside forward)
            return ZERO_GRADIENTS
        (grad,) = torch.autograd.grad(loss, x_in, allow_unused=True)
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
    if grad is None:
        return ZERO_GRADIENTS
    zero = (grad.flatten(1).abs().amax(1) == 0).float().mean()
    return ZERO_GRADIENTS if float(zero) >= min_share else None


def check_randomised_outputs(
    model: Classifier,
    x: torch.Tensor,
    reference: Outputs | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-4,
) -> str | None:
    """Flag when two evaluations of the same batch differ beyond ``atol + rtol * max|logit|``.

    The tolerance absorbs non-deterministic GPU reductions (about 1e-6 relative); dropout or
    input noise left on at inference differs by orders of magnitude more.

    Args:
        model: runner or module.
        x: a batch; reference: logits of a previous call on ``x`` (saves one call).
    """
    first = (
        predict(model, x)
        if reference is None
        else map_outputs(lambda t: t.detach().float().to(x.device), reference)
    )
    second = predict(model, x)
    for a, b in zip(as_tuple(first), as_tuple(second)):
        if a.numel() and float((a - b).abs().max()) > atol + rtol * float(a.abs().max()):
            return RANDOMISED
    return None


def output_flags(model: Classifier, x: torch.Tensor, logits: Outputs | None = None) -> list[str]:
    """The checks that need only outputs (probabilities, randomness), for runners and modules.

    Args:
        model: runner or module; x: a clean batch; logits: ``model(x)`` if already computed.

    Returns:
        The names of the raised flags (possibly empty).
    """
    logits = predict(model, x) if logits is None else logits
    found = [check_probabilities(as_tuple(logits)[0]), check_randomised_outputs(model, x, reference=logits)]
    return [f for f in found if f]


def paired_difference(weak_robust: torch.Tensor, strong_robust: torch.Tensor) -> tuple[int, float]:
    """How many more images the ``strong`` attack fooled than the ``weak`` one, on the same
    images, and the standard error of that count.

    Args:
        weak_robust, strong_robust: per image, whether it survived each attack (same images,
            same order).

    Returns:
        ``(b - c, sqrt(b + c))`` with ``b`` the images only the strong attack fooled and
        ``c`` those only the weak one fooled (McNemar's test for paired outcomes).
    """
    if weak_robust.shape != strong_robust.shape:
        raise ValueError(
            f"compare the same images: got {tuple(weak_robust.shape)} and {tuple(strong_robust.shape)}"
        )
    only_strong = int((weak_robust & ~strong_robust).sum())
    only_weak = int((~weak_robust & strong_robust).sum())
    return only_strong - only_weak, (only_strong + only_weak) ** 0.5


def _stronger(weak_robust: torch.Tensor, strong_robust: torch.Tensor, z: float, flag: str) -> str | None:
    excess, standard_error = paired_difference(weak_robust.bool(), strong_robust.bool())
    return flag if excess > 0 and excess > z * standard_error else None


def check_black_box_stronger(
    white_box_robust: torch.Tensor, black_box_robust: torch.Tensor, z: float = 2.0
) -> str | None:
    """Flag a black-box attack that fools more images than the white-box ones, beyond noise.

    A black-box attack has strictly less information than a white-box one at the same norm
    and eps; when it does better, the gradients are misleading (AutoAttack's argument). The
    comparison is like with like: both arguments are per-image outcomes at the same budget on
    the same images (``white_box_robust`` the worst case over the white-box attacks). It fires
    when the black-box accuracy is lower by more than ``z`` (2) standard errors of the paired
    difference: ``b - c > z * sqrt(b + c)``, ``b`` the images only the black-box attack fooled,
    ``c`` those only the white-box ones fooled. On n images that is a tolerance of
    ``z * sqrt(b + c) / n`` points of accuracy, which shrinks as the images grow.
    """
    return _stronger(white_box_robust, black_box_robust, z, BLACK_BOX_STRONGER)


def check_transfer_stronger(
    white_box_robust: torch.Tensor, transfer_robust: torch.Tensor, z: float = 2.0
) -> str | None:
    """Flag examples crafted on another model that fool this one more than white-box attacks
    on itself (same images, same budget), beyond ``z`` paired standard errors as in
    :func:`check_black_box_stronger`: its own gradients are misleading."""
    return _stronger(white_box_robust, transfer_robust, z, TRANSFER_STRONGER)


def check_engine_agreement(
    agreement: float, precision: str, min_agreement: Mapping[str, float] | None = None
) -> str | None:
    """Flag an engine whose clean top-1 agreement with PyTorch is below its precision's minimum.

    Args:
        agreement: share of samples where engine and PyTorch predict the same class, in [0, 1].
        precision: the engine's precision, a key of ``min_agreement``.
        min_agreement: precision → minimum agreement; default :data:`DEFAULT_MIN_AGREEMENT`.

    Raises:
        UserError: ``precision`` has no threshold.
    """
    limits = DEFAULT_MIN_AGREEMENT if min_agreement is None else min_agreement
    if precision not in limits:
        raise UserError(f"no agreement threshold for precision {precision!r}; known: {', '.join(limits)}")
    return ENGINE_DISAGREES if agreement < limits[precision] else None
