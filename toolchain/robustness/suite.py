"""The robustness suite: clean, corruptions, white-box, transfer and black-box, on every runner.

One pass over the validation batches evaluates a model on all its runners at once, so work is
shared: corrupted images are generated once per batch and fed to every runner; white-box
adversarial examples are crafted once on the PyTorch model and replayed on every exported
engine (mode ``transfer``); black-box attacks run against each runner itself. Only counters
are kept between batches, so memory does not grow with the number of samples.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from exporters.base import Runner
from toolchain.recipe import EvalAttackConfig, ValidateConfig
from toolchain.robustness import sanity
from toolchain.robustness.attacks import build_attack
from toolchain.robustness.corruptions import corrupt

log = logging.getLogger(__name__)


@dataclass
class _Tally:
    """Counters for one runner: correct / seen per metric, and parity statistics."""

    correct: dict[str, int] = field(default_factory=dict)
    seen: dict[str, int] = field(default_factory=dict)
    queries: dict[str, int] = field(default_factory=dict)
    max_abs_diff: float = 0.0
    agree: int = 0
    compared: int = 0

    def add(self, key: str, logits: torch.Tensor, y: torch.Tensor) -> None:
        self.correct[key] = self.correct.get(key, 0) + int((logits.argmax(1) == y).sum())
        self.seen[key] = self.seen.get(key, 0) + len(y)

    def compare(self, logits: torch.Tensor, reference: torch.Tensor) -> None:
        """Parity against the PyTorch model on the same clean batch."""
        self.max_abs_diff = max(self.max_abs_diff, float((logits - reference).abs().max()))
        self.agree += int((logits.argmax(1) == reference.argmax(1)).sum())
        self.compared += len(logits)

    def accuracy(self, key: str) -> float:
        return self.correct.get(key, 0) / max(self.seen.get(key, 0), 1)


def _attack_key(cfg: EvalAttackConfig, index: int) -> str:
    return f"attack{index}:{cfg.name}"


def _build(cfg: EvalAttackConfig) -> Any:
    return build_attack(
        cfg.name,
        eps=cfg.eps,
        norm=cfg.norm,
        steps=cfg.steps,
        step_size=cfg.step_size,
        restarts=cfg.restarts,
        queries=cfg.queries,
        seed=cfg.seed,
    )


def evaluate_model(
    model: nn.Module | None,
    runners: dict[str, Runner],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    cfg: ValidateConfig,
    *,
    model_name: str,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run the validate section on one model and each of its runners.

    Args:
        model: the PyTorch model the runners were made from: white-box attacks are crafted on
            it, and it is the parity reference. ``None`` for a bare engine (a user's own ONNX
            file): white-box and transfer attacks are then skipped and listed as such.
        runners: runtime name → runner; ``"torch"`` is the reference for parity if present.
        batches: validation ``(x, y)`` batches in [0, 1].
        cfg: the recipe's validate section.
        model_name: ``"dense"`` or ``"pruned"`` (written into each evaluation).

    Returns:
        One evaluation dict per runner, in the report.json layout (see README).
    """
    if model is not None:
        model.eval()
    attacks = [(_attack_key(a, i), a, _build(a)) for i, a in enumerate(cfg.attacks)]
    skipped = [
        {"name": a.name, "reason": "white-box attacks need the PyTorch model; only black-box ones run"}
        for _, a, attack in attacks
        if attack.mode == "white-box" and model is None
    ]
    attacks = [item for item in attacks if not (item[2].mode == "white-box" and model is None)]
    tallies = {name: _Tally() for name in runners}
    flags: dict[str, set[str]] = {name: set() for name in runners}
    corruption = cfg.corruptions
    first = True
    for batch_index, (x, y) in enumerate(
        tqdm(batches, desc=f"validate {model_name}", leave=False, disable=None if progress else True)
    ):
        reference = None
        if model is not None:
            with torch.no_grad():
                reference = model(x)
        for name, runner in runners.items():
            logits = runner(x)
            tallies[name].add("clean", logits, y)
            if reference is not None:
                tallies[name].compare(logits, reference)
            if first:
                flags[name].update(sanity.output_flags(runner, x, logits))
        if first and model is not None:
            # Masked gradients weaken white-box and transfer attacks on every runner alike.
            grad_flag = sanity.check_zero_gradients(model, x, y)
            for name in runners:
                flags[name].update([grad_flag] if grad_flag else [])
        first = False

        for key, acfg, attack in attacks:
            x_a, y_a = _cap(x, y, tallies, key, acfg.samples)
            if x_a is None:
                continue
            if attack.mode == "white-box":
                assert model is not None  # white-box attacks were dropped above without a model
                x_adv = attack(model, x_a, y_a).x_adv
                for name, runner in runners.items():
                    tallies[name].add(key, runner(x_adv), y_a)
            else:
                for name, runner in runners.items():
                    result = attack(runner, x_a, y_a)
                    tallies[name].add(key, runner(result.x_adv), y_a)
                    used = int(result.queries.sum()) if result.queries is not None else 0
                    tallies[name].queries[key] = tallies[name].queries.get(key, 0) + used

        for cname in corruption.names:
            for severity in corruption.severities:
                seed = corruption.seed * 1_000_003 + batch_index
                xc = corrupt(cname, x, severity, seed=seed)
                for name, runner in runners.items():
                    tallies[name].add(f"corruption:{cname}:{severity}", runner(xc), y)

    evaluations = [
        _evaluation(model_name, runner, tallies[name], flags[name], attacks, cfg)
        for name, runner in runners.items()
    ]
    for ev in evaluations:
        if skipped:
            ev["skipped"] = skipped
        if model is None:
            ev["parity"] = None
    return evaluations


def _cap(
    x: torch.Tensor, y: torch.Tensor, tallies: dict[str, _Tally], key: str, samples: int | None
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The part of this batch still within the attack's sample cap (None if the cap is reached)."""
    if samples is None:
        return x, y
    seen = next(iter(tallies.values())).seen.get(key, 0)
    left = samples - seen
    if left <= 0:
        return None, y
    return x[:left], y[:left]


def _evaluation(
    model_name: str,
    runner: Runner,
    tally: _Tally,
    flags: set[str],
    attacks: list[tuple[str, EvalAttackConfig, Any]],
    cfg: ValidateConfig,
) -> dict[str, Any]:
    is_reference = runner.runtime == "torch"
    attack_rows = []
    for key, acfg, attack in attacks:
        if key not in tally.seen:
            continue
        mode = ("white-box" if is_reference else "transfer") if attack.mode == "white-box" else "black-box"
        row: dict[str, Any] = {
            "name": acfg.name,
            "mode": mode,
            "norm": acfg.norm,
            "eps": acfg.eps,
            "steps": acfg.steps if attack.mode == "white-box" else 0,
            "queries": round(tally.queries[key] / tally.seen[key], 2) if key in tally.queries else 0,
            "samples": tally.seen[key],
            "accuracy": tally.accuracy(key),
        }
        attack_rows.append(row)
    white = [r["accuracy"] for r in attack_rows if r["mode"] in ("white-box", "transfer")]
    black = [r["accuracy"] for r in attack_rows if r["mode"] == "black-box"]
    flag = sanity.check_black_box_stronger(min(white) if white else None, min(black) if black else None)
    if flag:
        flags.add(flag)
    per_corruption: dict[str, dict[str, float]] = {}
    for cname in cfg.corruptions.names:
        per_corruption[cname] = {
            str(s): tally.accuracy(f"corruption:{cname}:{s}") for s in cfg.corruptions.severities
        }
    corruptions: dict[str, Any] = {}
    if per_corruption:
        values = [a for by_sev in per_corruption.values() for a in by_sev.values()]
        corruptions = {"per_corruption": per_corruption, "mean_accuracy": sum(values) / len(values)}
    agreement = tally.agree / max(tally.compared, 1)
    parity = {"reference": "torch", "max_abs_diff": tally.max_abs_diff, "top1_agreement": agreement}
    if not is_reference and tally.compared:
        flag = sanity.check_engine_agreement(agreement, runner.precision)
        if flag:
            flags.add(flag)
    return {
        "model": model_name,
        "runtime": runner.runtime,
        "precision": runner.precision,
        "device": runner.device,
        "samples": tally.seen.get("clean", 0),
        "clean_accuracy": tally.accuracy("clean"),
        "corruptions": corruptions,
        "attacks": attack_rows,
        "parity": parity,
        "flags": sorted(flags),
    }
