"""Numerical parity between a reference model and an exported one, measured on real images."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from exporters.base import Runner
from exporters.errors import ParityError, UserError
from exporters.outputs import Outputs, as_tuple, map_outputs

__all__ = [
    "Agreement",
    "Float64Check",
    "ParityResult",
    "argmax_agreement",
    "check_parity",
    "float64_check",
    "tie_flips",
]


@dataclass(frozen=True)
class ParityResult:
    """How closely a candidate runtime's logits follow the reference's.

    Attributes:
        max_abs_diff: the largest ``|reference - candidate|`` over all logits.
        mean_abs_diff: the mean of ``|reference - candidate|`` over all logits.
        top1_agreement: the fraction of predictions whose arg-max class is the same: one per
            image for ``(N, K)`` logits, one per pixel for ``(N, K, H, W)`` segmentation logits.
        samples: the number of images compared.
        disagreements: the number of predictions (images or pixels) whose arg-max differs.
        ties: per-pixel outputs only (None for ``(N, K)`` logits): pixels whose arg-max differs
            at a near-tie the logit difference explains (:func:`tie_flips`); they count as
            agreeing, since upsampled logits cross exactly at every class boundary.
        reference_max_abs: the largest ``|reference|`` logit, the scale ``max_abs_diff`` is
            relative to (an untrained network's logits can reach thousands).
    """

    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float
    samples: int
    disagreements: int
    reference_max_abs: float = 0.0
    ties: int | None = None

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)

    def require(self, *, atol: float, min_top1_agreement: float = 1.0) -> ParityResult:
        """Return ``self`` if within tolerance.

        Args:
            atol: the largest acceptable absolute logit difference.
            min_top1_agreement: the smallest acceptable top-1 agreement (fraction in [0, 1]).

        Raises:
            ParityError: the difference or the disagreement is too large; the message has both.
        """
        if self.max_abs_diff <= atol and self.top1_agreement >= min_top1_agreement:
            return self
        raise ParityError(
            f"exported model differs from the reference: max |dlogit| {self.max_abs_diff:.3e} "
            f"(allowed {atol:.1e}), top-1 agreement {self.top1_agreement:.4f} "
            f"(required {min_top1_agreement:.4f}, {self.disagreements}/{self.samples} images differ); "
            "check unsupported ops, precision, or re-export with another opset",
            max_abs_diff=self.max_abs_diff,
            top1_agreement=self.top1_agreement,
        )


#: ``agreement(reference, candidate) -> (agreeing, compared)`` predictions of one batch.
Agreement = Callable[[Outputs, Outputs], tuple[int, int]]


def argmax_agreement(reference: Outputs, candidate: Outputs) -> tuple[int, int]:
    """Same arg-max class per image (``(N, K)`` logits) or per pixel (``(N, K, H, W)``), a flip
    at an exact class boundary that rounding explains counting as agreeing
    (:func:`tie_flips`)."""
    expected, got = as_tuple(reference)[0], as_tuple(candidate)[0]
    differ = expected.argmax(dim=1) != got.argmax(dim=1)
    if expected.dim() == 4:  # per-pixel logits: flips at exact class boundaries are numerics
        differ &= ~tie_flips(expected, got)
    return int((~differ).sum()), differ.numel()


def check_parity(
    reference: Callable[[torch.Tensor], Outputs],
    candidate: Runner,
    batches: Iterable[torch.Tensor],
    *,
    agreement: Agreement | None = None,
) -> ParityResult:
    """Run both models on every batch and compare their outputs.

    Args:
        reference: the model to trust, usually a :class:`~exporters.torch_runner.TorchRunner`
            (any callable mapping pixels to outputs works).
        candidate: the exported model's runner.
        batches: float32 ``(N, C, H, W)`` pixel batches in [0, 1], ideally real images: random
            noise leaves most logits near zero and hides disagreements.
        agreement: how many predictions agree in a batch (default :func:`argmax_agreement`;
            a detector's task matches detections instead).

    Returns:
        The :class:`ParityResult` over all batches; the differences cover every output tensor.

    Raises:
        UserError: no batch was given, or the two models return outputs of different shapes.
        InputSpecError: a batch does not fit the candidate's input spec.
    """
    agree_fn = agreement or argmax_agreement
    max_diff, abs_sum, elements, samples, predictions, disagreements, scale = 0.0, 0.0, 0, 0, 0, 0, 0.0
    ties: int | None = None
    for x in batches:
        with torch.no_grad():  # the reference may be a raw module with gradients enabled
            expected = _outputs(reference(x))
        got = candidate(x)
        pairs = list(zip(as_tuple(expected), as_tuple(got)))
        if len(as_tuple(expected)) != len(as_tuple(got)) or any(e.shape != g.shape for e, g in pairs):
            raise UserError(
                f"reference outputs {_shapes(expected)} and {candidate.name} outputs {_shapes(got)} differ "
                "in shape; are they the same model?"
            )
        for e, g in pairs:
            # A NaN must fail parity, but max() would silently skip it: count it as infinitely far.
            diff = torch.nan_to_num((e - g).abs(), nan=float("inf"))
            max_diff = max(max_diff, float(diff.max()) if diff.numel() else 0.0)
            scale = max(scale, float(e.abs().max()) if e.numel() else 0.0)
            abs_sum += float(diff.double().sum())
            elements += diff.numel()
        first = as_tuple(expected)[0]
        samples += first.shape[0]
        if agreement is None and first.dim() == 4:
            ties = (ties or 0) + int(tie_flips(first, as_tuple(got)[0]).sum())
        agree, compared = agree_fn(expected, got)
        predictions += compared
        disagreements += compared - agree
    if samples == 0:
        raise UserError("check_parity got no images; give it at least one non-empty batch")
    return ParityResult(
        max_abs_diff=max_diff,
        mean_abs_diff=abs_sum / max(elements, 1),
        top1_agreement=(predictions - disagreements) / predictions if predictions else 1.0,
        samples=samples,
        disagreements=disagreements,
        reference_max_abs=scale,
        ties=ties,
    )


def _shapes(out: Outputs) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in as_tuple(out)]


@dataclass(frozen=True)
class Float64Check:
    """Whether a logit difference is the export's or float32's: both runs against float64.

    An untrained or badly conditioned network (huge activations, BatchNorm over near-constant
    channels) amplifies float32 rounding until PyTorch itself is far from the exact result; an
    engine that computes in another order (fused Conv+BN, other convolution algorithms) then
    lands elsewhere by the same amount, and ``max_abs_diff`` alone cannot tell that from a wrong
    export. Measured against the same model in float64:

    Attributes:
        torch_fp32_max_abs_diff: the largest ``|PyTorch float32 - float64|`` logit difference,
            float32's own error on these images.
        engine_max_abs_diff: the largest ``|engine - float64|`` logit difference.
        torch_fp32_top1_agreement, engine_top1_agreement: the fraction of arg-maxes (per image,
            or per pixel) equal to float64's.
    """

    torch_fp32_max_abs_diff: float
    engine_max_abs_diff: float
    torch_fp32_top1_agreement: float = 1.0
    engine_top1_agreement: float = 1.0

    def rounding_explains(self, factor: float, atol: float) -> bool:
        """The engine is within ``factor`` times float32 PyTorch's own error (or ``atol``) and
        picks float64's class at least as often as float32 PyTorch does."""
        close = self.engine_max_abs_diff <= max(atol, factor * self.torch_fp32_max_abs_diff)
        return close and self.engine_top1_agreement >= self.torch_fp32_top1_agreement

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def float64_check(model: nn.Module, candidate: Runner, batches: Iterable[torch.Tensor]) -> Float64Check:
    """Compare float32 PyTorch and ``candidate`` with a float64 copy of ``model`` (see
    :class:`Float64Check`); the caller's module is not changed.

    Args:
        model: the PyTorch model the engine was exported from (CPU).
        candidate: the exported model's runner.
        batches: the images of the parity check.

    Raises:
        UserError: no batch was given.
    """
    exact = copy.deepcopy(model).double().eval()
    was_training = model.training
    model.eval()
    torch_diff, engine_diff, seen, predictions, torch_same, engine_same = 0.0, 0.0, 0, 0, 0, 0
    try:
        with torch.no_grad():
            for x in batches:
                reference = as_tuple(exact(x.double()))
                fp32 = [t.detach().double() for t in as_tuple(model(x))]
                got = [t.double() for t in as_tuple(candidate(x))]
                for r, f, g in zip(reference, fp32, got):
                    torch_diff = max(torch_diff, _max_abs_diff(f, r.detach()))
                    engine_diff = max(engine_diff, _max_abs_diff(g, r.detach()))
                classes = reference[0].argmax(1)
                torch_same += int((fp32[0].argmax(1) == classes).sum())
                engine_same += int((got[0].argmax(1) == classes).sum())
                predictions += classes.numel()
                seen += x.shape[0]
    finally:
        model.train(was_training)
    if not seen:
        raise UserError("float64_check got no images; give it at least one non-empty batch")
    return Float64Check(
        torch_fp32_max_abs_diff=torch_diff,
        engine_max_abs_diff=engine_diff,
        torch_fp32_top1_agreement=torch_same / predictions,
        engine_top1_agreement=engine_same / predictions,
    )


#: The largest logit difference at a position that can still explain a tie: FP32 rounding is
#: orders of magnitude below it, a model that really differs is above it.
TIE_ATOL = 1e-3


def tie_flips(reference: torch.Tensor, candidate: torch.Tensor, atol: float = TIE_ATOL) -> torch.Tensor:
    """Where the arg-maxes differ only at a near-tie that rounding explains.

    Per position (image, or pixel of ``(N, K, H, W)`` logits): the candidate picks another
    class than the reference while its logits there differ from the reference's by at most
    ``atol``. Overturning a margin takes a difference of at least half of it, so such a flip is
    a tie within ``2 * atol`` that rounding decides either way. NaN or Inf is never a tie.
    """
    delta = (reference - candidate).abs().amax(1)
    return (reference.argmax(1) != candidate.argmax(1)) & (delta <= atol)


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b|``, a NaN counting as infinitely far."""
    diff = torch.nan_to_num((a - b).abs(), nan=float("inf"))
    return float(diff.max()) if diff.numel() else 0.0


def _outputs(out: Outputs) -> Outputs:
    """The reference may be a raw module: detach it and bring it to float32 on the CPU."""
    if not all(isinstance(t, torch.Tensor) for t in as_tuple(out)):
        raise UserError(f"the reference returned {type(out).__name__}, expected tensors")
    return map_outputs(lambda t: t.detach().to("cpu", torch.float32), out)
