"""Mixed precision for QAT: which layers to leave in float before quantisation-aware fine-tuning.

The same search as the post-training files' (:func:`calibration.select.greedy_fp32`), measured on
the fake-quantised PyTorch model instead of a written file: each candidate is
:func:`calibration.qat.prepare_qat` with some layers left in float and its activation scales
started from the calibration images, and its agreement is its top-1 agreement with the FP32
file's labels on the held-out images (clean and PGD-transfer). Before training, the
fake-quantised model computes what its Q/DQ file computes, so this is the post-training
sensitivity of each layer under QAT's own rounding; training then starts from the chosen layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from calibration.qat import float_layers, init_activation_ranges, prepare_qat
from calibration.schemes import QuantScheme
from calibration.select import Agreement, HeldOut, MixedPrecision, greedy_fp32
from exporters.outputs import as_tuple

__all__ = ["keep_sensitive_float"]


def keep_sensitive_float(
    model: nn.Module,
    example: torch.Tensor,
    scheme: str | QuantScheme,
    calibration: Sequence[torch.Tensor],
    held_out: HeldOut,
    target: float,
    *,
    adversarial_target: float | None = None,
    init: str = "minmax",
    percentile: float = 99.99,
    max_float: int | None = None,
    batch_size: int = 256,
) -> MixedPrecision:
    """Keep the layers whose rounding costs most agreement in float until ``target`` is met.

    Args:
        model: the float model QAT will quantise (not changed).
        example: one input batch (as :func:`prepare_qat` takes it).
        scheme: the target runtime's INT8 scheme.
        calibration: the batches activation scales start from (as QAT's own start).
        held_out: images the calibration does not use, with the FP32 file's labels on them.
        target, adversarial_target: the agreement clean (and PGD-transfer) held-out images must
            reach (``adversarial_target`` None: ``target``).
        init, percentile: how activation scales start (``quantize.qat.init``).
        max_float: keep at most this many layers in float (None: all but one if need be;
            QAT needs one quantised layer).
        batch_size: images per forward pass when measuring.

    Returns:
        A :class:`MixedPrecision` whose ``fp32_nodes`` are layer names of ``model``, most
        sensitive first (``prepare_qat(..., keep_float=...)`` takes them).
    """

    def candidate(keep_float: Sequence[str]) -> nn.Module:
        qat = prepare_qat(model, example, scheme, learn_scales=False, keep_float=keep_float)
        init_activation_ranges(qat, calibration, method=init, percentile=percentile)
        return qat

    def agreement(keep_float: Sequence[str]) -> Agreement:
        qat = candidate(keep_float)
        shares = {
            kind: float(np.mean(_labels(qat, x, batch_size) == held_out.reference[kind]))
            for kind, x in held_out.inputs.items()
        }
        return Agreement(shares["clean"], shares.get("adversarial"))

    # Every convolution and linear layer: those of the float model (none wrapped yet), by the
    # names prepare_qat keeps.
    layers = list(float_layers(model))
    cap = len(layers) - 1 if max_float is None else min(max_float, len(layers) - 1)
    return greedy_fp32(layers, agreement, target, adversarial_target, max_fp32=cap)


@torch.no_grad()
def _labels(model: nn.Module, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Arg-max over the first output's class axis (per image, or per pixel)."""
    outputs = [
        as_tuple(model(torch.from_numpy(x[i : i + batch_size])))[0].argmax(1).numpy()
        for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(outputs)
