"""Per-image outcomes of one runner during a suite pass, and their summary as an evaluation.

Robust accuracy is counted as the field defines it (AutoAttack): an image counts as robust
against an attack only if the runner classifies it correctly clean, the attack was run on it,
and the runner still classifies the attacked image correctly. Per budget ``(norm, eps)`` the
evaluation's ``robust_accuracy`` is the per-image worst case over every attack run at that
budget, on the images all of them saw: attacks with a ``samples`` cap see the first ``cap``
images of the stream, so the common images are the first ``min(cap)``.

Only booleans per image (and counters) are kept, never the images.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch

from toolchain.report.schema import AttackRow, Corruptions, Parity, RobustAccuracy
from toolchain.robustness import sanity


def share(mask: torch.Tensor) -> float:
    """The fraction of ``True`` in a boolean mask, exactly (``k / n``, not a float32 mean); 0.0 if empty."""
    return int(mask.sum()) / len(mask) if len(mask) else 0.0


def finite_rows(logits: torch.Tensor) -> torch.Tensor:
    """Which rows (images) have only finite logits."""
    return torch.isfinite(logits).all(dim=1)


def correct(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Top-1 correct per image; an image with a NaN or Inf logit is never correct."""
    return (logits.argmax(1) == y) & finite_rows(logits)


@dataclass(frozen=True)
class AttackSpec:
    """One attack as the suite runs it: its key, report name, budget and mode."""

    key: str
    name: str
    norm: str
    eps: float
    mode: str  # "white-box" or "black-box" (the attack's own mode)
    steps: int
    ensemble: str | None = None


@dataclass
class RunnerOutcomes:
    """Everything one runner's evaluation needs, accumulated batch by batch."""

    clean: list[torch.Tensor] = field(default_factory=list)
    robust: dict[str, list[torch.Tensor]] = field(default_factory=lambda: defaultdict(list))
    queries: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    corruption_correct: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    corruption_seen: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    nonfinite_logits: int = 0
    max_abs_diff: float = 0.0
    agree: int = 0
    compared: int = 0
    parity_nonfinite: int = 0

    def outputs(self, logits: torch.Tensor) -> None:
        """Count the images for which this runner returned a NaN or Inf logit."""
        self.nonfinite_logits += int((~finite_rows(logits)).sum())

    def compare(self, logits: torch.Tensor, reference: torch.Tensor) -> None:
        """Parity against the PyTorch model on the same clean batch; a NaN or Inf on either
        side is a disagreement, and makes ``max_abs_diff`` undefined (never silently 0)."""
        finite = finite_rows(logits) & finite_rows(reference)
        self.parity_nonfinite += int((~finite).sum())
        if finite.any():
            diff = float((logits[finite] - reference[finite]).abs().max())
            self.max_abs_diff = max(self.max_abs_diff, diff)
        self.agree += int(((logits.argmax(1) == reference.argmax(1)) & finite).sum())
        self.compared += len(logits)

    def clean_correct(self, upto: int | None = None) -> torch.Tensor:
        return torch.cat(self.clean)[:upto] if self.clean else torch.zeros(0, dtype=torch.bool)

    def parity(self) -> Parity:
        return Parity(
            reference="torch",
            max_abs_diff=None if self.parity_nonfinite else self.max_abs_diff,
            top1_agreement=self.agree / max(self.compared, 1),
            compared=self.compared,
            nonfinite=self.parity_nonfinite,
        )

    def robust_mask(self, key: str) -> torch.Tensor:
        parts = self.robust.get(key, [])
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)


def _mode_on(spec: AttackSpec, is_reference: bool) -> str:
    if spec.mode == "black-box":
        return "black-box"
    return "white-box" if is_reference else "transfer"


def attack_rows(outcomes: RunnerOutcomes, specs: list[AttackSpec], is_reference: bool) -> list[AttackRow]:
    """One row per attack that ran on this runner."""
    rows = []
    for spec in specs:
        mask = outcomes.robust_mask(spec.key)
        if len(mask) == 0:
            continue
        queries = outcomes.queries.get(spec.key)
        rows.append(
            AttackRow(
                name=spec.name,
                mode=_mode_on(spec, is_reference),  # type: ignore[arg-type]
                norm=spec.norm,
                eps=spec.eps,
                steps=spec.steps if spec.mode == "white-box" else 0,
                queries=round(queries / len(mask), 2) if queries is not None else 0.0,
                samples=len(mask),
                accuracy=share(mask),
                ensemble=spec.ensemble,
            )
        )
    return rows


def _budgets(specs: list[AttackSpec]) -> dict[tuple[str, float], list[AttackSpec]]:
    groups: dict[tuple[str, float], list[AttackSpec]] = defaultdict(list)
    for spec in specs:
        groups[(spec.norm, spec.eps)].append(spec)
    return groups


def _worst_case(outcomes: RunnerOutcomes, specs: list[AttackSpec], upto: int) -> torch.Tensor:
    robust = torch.ones(upto, dtype=torch.bool)
    for spec in specs:
        robust &= outcomes.robust_mask(spec.key)[:upto]
    return robust


def robust_accuracy(outcomes: RunnerOutcomes, specs: list[AttackSpec]) -> list[RobustAccuracy]:
    """Per budget: images that survive every attack run at it, on the images all of them saw."""
    entries = []
    for (norm, eps), group in _budgets(specs).items():
        ran = [s for s in group if len(outcomes.robust_mask(s.key))]
        if not ran:
            continue
        common = min(len(outcomes.robust_mask(s.key)) for s in ran)
        robust = _worst_case(outcomes, ran, common)
        entries.append(
            RobustAccuracy(
                norm=norm,
                eps=eps,
                accuracy=share(robust),
                samples=common,
                attacks=[s.name for s in ran],
            )
        )
    return entries


def black_box_flags(outcomes: RunnerOutcomes, specs: list[AttackSpec]) -> set[str]:
    """``black-box-stronger-than-white-box``, like with like: per budget, black-box attacks
    against the per-image worst case of the white-box (or transfer) attacks at the same norm
    and eps, on the images both saw."""
    flags: set[str] = set()
    for group in _budgets(specs).values():
        ran = [s for s in group if len(outcomes.robust_mask(s.key))]
        white = [s for s in ran if s.mode == "white-box"]
        black = [s for s in ran if s.mode == "black-box"]
        if not white or not black:
            continue
        common = min(len(outcomes.robust_mask(s.key)) for s in ran)
        flag = sanity.check_black_box_stronger(
            _worst_case(outcomes, white, common), _worst_case(outcomes, black, common)
        )
        if flag:
            flags.add(flag)
    return flags


def corruption_summary(outcomes: RunnerOutcomes, names: list[str], severities: list[int]) -> Corruptions:
    """Accuracy per corruption and severity, and their mean."""
    if not names:
        return Corruptions()
    per: dict[str, dict[str, float]] = {}
    for name in names:
        per[name] = {}
        for s in severities:
            key = f"{name}:{s}"
            per[name][str(s)] = outcomes.corruption_correct[key] / max(outcomes.corruption_seen[key], 1)
    values = [a for by_sev in per.values() for a in by_sev.values()]
    return Corruptions(per_corruption=per, mean_accuracy=sum(values) / len(values) if values else None)
