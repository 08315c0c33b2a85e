"""INT8 against FP32: do the two files give the same answers, on clean and perturbed inputs?

Quantisation error is largest near decision boundaries, which is where adversarial and
corrupted images sit, so agreement is measured on each kind of input separately.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from exporters.base import Runner

__all__ = ["ParityCounter", "compare_precisions"]


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
class _Kinds:
    counters: dict[str, ParityCounter] = field(default_factory=dict)

    def add(self, kind: str, reference: torch.Tensor, candidate: torch.Tensor, y: torch.Tensor) -> None:
        self.counters.setdefault(kind, ParityCounter()).add(reference, candidate, y)
        self.counters.setdefault("all", ParityCounter()).add(reference, candidate, y)


def compare_precisions(
    reference: Runner,
    candidates: dict[str, Runner],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    model: nn.Module | None = None,
    attack: dict[str, Any] | None = None,
    corruptions: Sequence[str] = (),
    severity: int = 3,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Agreement of each candidate (an INT8 file) with the reference (its FP32 file).

    Args:
        reference: the FP32 runner.
        candidates: name -> runner to compare.
        batches: ``(x, y)`` validation batches in [0, 1].
        model: the PyTorch model; with ``attack``, PGD examples crafted on it are compared too
            (the same transfer examples the suite replays on every engine).
        attack: PGD options (``eps``, ``steps``, ``step_size``, ``norm``).
        corruptions: corruption names compared at ``severity``.
        severity: corruption severity.
        seed: seeds the attack and the corruptions.

    Returns:
        Per candidate: ``{"reference": reference.name, "clean": {...}, "adversarial": {...},
        "corrupted": {...}, "all": {...}}``, each as :meth:`ParityCounter.as_dict`.
    """
    from toolchain.robustness.attacks import build_attack
    from toolchain.robustness.corruptions import corrupt

    pgd = build_attack("pgd", seed=seed, **attack) if attack and model is not None else None
    tallies = {name: _Kinds() for name in candidates}
    for index, (x, y) in enumerate(batches):
        inputs = {"clean": [x]}
        if pgd is not None:
            assert model is not None
            inputs["adversarial"] = [pgd(model.eval(), x, y).x_adv.detach()]
        inputs["corrupted"] = [corrupt(c, x, severity, seed=seed * 1_000_003 + index) for c in corruptions]
        for kind, xs in inputs.items():
            for xk in xs:
                ref = reference(xk)
                for name, runner in candidates.items():
                    tallies[name].add(kind, ref, runner(xk), y)
    return {
        name: {"reference": reference.name, **{k: c.as_dict() for k, c in t.counters.items()}}
        for name, t in tallies.items()
    }
