"""INT8 against FP32: do the two files give the same answers, on clean and perturbed inputs?

Quantisation error is largest near decision boundaries, which is where adversarial and
corrupted images sit, so agreement is measured on each kind of input separately.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from calibration.data import Corrupt, Craft
from exporters.base import Runner
from exporters.errors import UserError
from exporters.outputs import as_tuple
from exporters.parity import tie_flips

__all__ = ["Agreement", "MatchedParityCounter", "ParityCounter", "PixelParityCounter", "compare_precisions"]

#: ``(reference outputs, candidate outputs) -> (agreeing, compared)`` units of one batch.
Agreement = Callable[[Any, Any], tuple[int, int]]

#: Label of unlabelled pixels in segmentation batches (Cityscapes' 255): no flip is counted there.
IGNORE_INDEX = 255


@dataclass
class ParityCounter:
    """Running agreement statistics between a reference and a candidate on one kind of input.

    ``top1_agreement`` counts same-label images; ``label_flip_rate`` is the share of images the
    reference classifies correctly that the candidate gets wrong (the flips that cost accuracy);
    ``max_abs_diff`` is the largest logit difference.
    """

    samples: int = 0
    agree: int = 0
    reference_correct: int = 0
    flipped: int = 0
    max_abs_diff: float = 0.0

    def add(self, reference: torch.Tensor, candidate: torch.Tensor, y: torch.Tensor) -> None:
        ref_label, cand_label = reference.argmax(1), candidate.argmax(1)
        ref_ok = ref_label == y
        self.samples += len(y)
        self.agree += int((ref_label == cand_label).sum())
        self.reference_correct += int(ref_ok.sum())
        self.flipped += int((ref_ok & (cand_label != y)).sum())
        self._track_diff(reference, candidate)

    def _track_diff(self, reference: torch.Tensor, candidate: torch.Tensor) -> None:
        """Keep the largest logit difference; a NaN counts as infinitely far."""
        diff = torch.nan_to_num((reference - candidate).abs(), nan=float("inf"))
        self.max_abs_diff = max(self.max_abs_diff, float(diff.max()) if diff.numel() else 0.0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "top1_agreement": self.agree / self.samples if self.samples else None,
            "label_flip_rate": self.flipped / self.reference_correct if self.reference_correct else None,
            "max_abs_diff": self.max_abs_diff if self.samples else None,
        }


@dataclass
class PixelParityCounter(ParityCounter):
    """:class:`ParityCounter` for ``(N, K, H, W)`` segmentation logits: one prediction per pixel.

    ``top1_agreement`` is the share of all pixels with the same arg-max, where a flip at a
    near-tie that the logit difference explains (:func:`exporters.parity.tie_flips`) counts as
    agreeing and is counted in ``ties``, as the FP32 export's parity does; ``label_flip_rate``
    is the share of labelled pixels (``y != 255``) the reference gets right and the candidate
    gets wrong; ``samples`` counts images, ``pixels`` the pixels compared.
    """

    pixels: int = 0
    ties: int = 0

    def add(self, reference: torch.Tensor, candidate: torch.Tensor, y: torch.Tensor) -> None:
        ref_label, cand_label = reference.argmax(1), candidate.argmax(1)
        tied = tie_flips(reference, candidate)
        labelled = y != IGNORE_INDEX
        ref_ok = (ref_label == y) & labelled
        self.samples += len(y)
        self.pixels += ref_label.numel()
        self.agree += int(((ref_label == cand_label) | tied).sum())
        self.ties += int(tied.sum())
        self.reference_correct += int(ref_ok.sum())
        self.flipped += int((ref_ok & (cand_label != y) & ~tied).sum())
        self._track_diff(reference, candidate)

    def as_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "pixels": self.pixels,
            "top1_agreement": self.agree / self.pixels if self.pixels else None,
            "ties": self.ties,
            "label_flip_rate": self.flipped / self.reference_correct if self.reference_correct else None,
            "max_abs_diff": self.max_abs_diff if self.samples else None,
        }


@dataclass
class MatchedParityCounter:
    """Agreement of whole outputs by a caller's rule (a detector's detections matched across the
    two files): ``top1_agreement`` is the agreeing share of the units the rule compares;
    ``max_abs_diff`` the largest difference of the first output (the class scores)."""

    agreement: Agreement
    samples: int = 0
    agree: int = 0
    compared: int = 0
    max_abs_diff: float = 0.0

    def add(self, reference: Any, candidate: Any, y: Any) -> None:
        agree, compared = self.agreement(reference, candidate)
        self.samples += len(y)
        self.agree += agree
        self.compared += compared
        diff = torch.nan_to_num((as_tuple(reference)[0] - as_tuple(candidate)[0]).abs(), nan=float("inf"))
        self.max_abs_diff = max(self.max_abs_diff, float(diff.max()) if diff.numel() else 0.0)

    def as_dict(self) -> dict[str, Any]:
        # Nothing to compare (neither file detects anything) is agreement, not a gap.
        share = self.agree / self.compared if self.compared else 1.0
        return {
            "samples": self.samples,
            "compared": self.compared,
            "top1_agreement": share if self.samples else None,
            "label_flip_rate": None,
            "max_abs_diff": self.max_abs_diff if self.samples else None,
        }


@dataclass
class _Kinds:
    agreement: Agreement | None = None
    counters: dict[str, Any] = field(default_factory=dict)

    def add(self, kind: str, reference: Any, candidate: Any, y: Any) -> None:
        if self.agreement is not None:
            for key in (kind, "all"):
                counter = self.counters.setdefault(key, MatchedParityCounter(self.agreement))
                counter.add(reference, candidate, y)
            return
        reference, candidate = as_tuple(reference)[0], as_tuple(candidate)[0]
        # Per-pixel logits are told apart by their rank, so no caller needs to name its task.
        make = PixelParityCounter if reference.dim() == 4 else ParityCounter
        self.counters.setdefault(kind, make()).add(reference, candidate, y)
        self.counters.setdefault("all", make()).add(reference, candidate, y)


def compare_precisions(
    reference: Runner,
    candidates: dict[str, Runner],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    craft: Craft | None = None,
    corrupt: Corrupt | None = None,
    corruptions: Sequence[str] = (),
    severity: int = 3,
    seed: int = 0,
    agreement: Agreement | None = None,
) -> dict[str, dict[str, Any]]:
    """Agreement of each candidate (an INT8 file) with the reference (its FP32 file).

    Args:
        reference: the FP32 runner.
        candidates: name -> runner to compare.
        batches: ``(x, y)`` validation batches in [0, 1].
        craft: ``(x, y) -> x_adv``, the adversarial inputs to compare on (the caller's attack
            crafted on its PyTorch model, as the suite replays them on every engine); none:
            no adversarial comparison.
        corrupt: applies a named corruption (needed with ``corruptions``).
        corruptions: corruption names compared at ``severity``.
        severity: corruption severity.
        seed: seeds the attack and the corruptions.
        agreement: ``(reference outputs, candidate outputs) -> (agreeing, compared)`` for
            outputs the arg-max does not judge (a detector's); None: the arg-max class of the
            first output, per image or per pixel.

    Returns:
        Per candidate: ``{"reference": reference.name, "clean": {...}, "adversarial": {...},
        "corrupted": {...}, "all": {...}}``, each as :meth:`ParityCounter.as_dict` (per image)
        or :meth:`PixelParityCounter.as_dict` (per pixel, for ``(N, K, H, W)`` logits).

    Raises:
        UserError: ``corruptions`` named without a ``corrupt`` function.
    """
    if corruptions and corrupt is None:
        raise UserError("compare_precisions: corruptions are named but no corrupt function is given")
    tallies = {name: _Kinds(agreement) for name in candidates}
    for index, (x, y) in enumerate(batches):
        inputs = {"clean": [x]}
        if craft is not None:
            inputs["adversarial"] = [craft(x, y).detach()]
        if corrupt is not None:
            inputs["corrupted"] = [
                corrupt(c, x, severity, seed=seed * 1_000_003 + index) for c in corruptions
            ]
        for kind, xs in inputs.items():
            for xk in xs:
                # Logits (per image or per pixel); without an agreement rule a model with
                # several outputs is compared on its first (its class scores).
                ref = reference(xk)
                for name, runner in candidates.items():
                    tallies[name].add(kind, ref, runner(xk), y)
    return {
        name: {"reference": reference.name, **{k: c.as_dict() for k, c in t.counters.items()}}
        for name, t in tallies.items()
    }
