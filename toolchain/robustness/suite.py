"""The robustness suite: clean, corruptions, white-box, transfer and black-box, on every runner.

One pass over the validation batches evaluates a model on all its runners at once, so work is
shared: corrupted images are generated once per batch and fed to every runner; white-box
adversarial examples are crafted once on the PyTorch model and replayed on every exported
engine (mode ``transfer``); black-box attacks run against each runner itself. Attacks run
only on correctly classified images; per image, only booleans and counters are kept, so
memory does not grow with the images (see :mod:`toolchain.robustness.outcomes` for how robust
accuracy is counted).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from exporters.base import Runner
from toolchain.recipe import EvalAttackConfig, ValidateConfig
from toolchain.report.schema import Evaluation, Skipped
from toolchain.robustness import sanity
from toolchain.robustness.attacks import Attack, build_attack
from toolchain.robustness.corruptions import corrupt
from toolchain.robustness.outcomes import (
    AttackSpec,
    RunnerOutcomes,
    attack_rows,
    black_box_flags,
    correct,
    corruption_summary,
    robust_accuracy,
    share,
)

log = logging.getLogger(__name__)


def build_suite_attacks(cfgs: list[EvalAttackConfig]) -> list[tuple[AttackSpec, Attack, int | None]]:
    """The attacks of a validate section, ensembles expanded into their parts.

    Returns:
        ``(spec, attack, samples cap)`` per attack the suite runs.

    Raises:
        UnknownNameError, UserError: an unknown name or invalid options.
    """
    built = []
    for i, cfg in enumerate(cfgs):
        attack = build_attack(
            cfg.name,
            eps=cfg.eps,
            norm=cfg.norm,
            steps=cfg.steps,
            step_size=cfg.step_size,
            restarts=cfg.restarts,
            queries=cfg.queries,
            targets=cfg.targets,
            seed=cfg.seed,
        )
        parts = attack.components()
        ensemble = cfg.name if parts != [attack] else None
        for j, part in enumerate(parts):
            spec = AttackSpec(
                key=f"attack{i}.{j}:{part.name}",
                name=part.name,
                norm=part.norm,
                eps=part.eps,
                mode=part.mode,
                steps=part.steps,
                ensemble=ensemble,
            )
            built.append((spec, part, cfg.samples))
    return built


def evaluate_model(
    model: nn.Module | None,
    runners: dict[str, Runner],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    cfg: ValidateConfig,
    *,
    model_name: str,
    progress: bool = True,
) -> list[Evaluation]:
    """Run the validate section on one model and each of its runners.

    Args:
        model: the PyTorch model the runners were made from: white-box attacks are crafted on
            it, and it is the parity reference. ``None`` for a bare engine (a user's own ONNX
            file): white-box and transfer attacks are then skipped and listed as such.
        runners: runtime name → runner; parity is measured against ``model`` on each.
        batches: validation ``(x, y)`` batches in [0, 1].
        cfg: the recipe's validate section.
        model_name: ``"dense"`` or ``"pruned"`` (written into each evaluation).

    Returns:
        One evaluation per runner (report.json's ``evaluations[]`` records).
    """
    if model is not None:
        model.eval()
    attacks = build_suite_attacks(list(cfg.attacks))
    skipped = [
        Skipped(name=spec.name, reason="white-box attacks need the PyTorch model; only black-box ones run")
        for spec, _, _ in attacks
        if spec.mode == "white-box" and model is None
    ]
    attacks = [item for item in attacks if not (item[0].mode == "white-box" and model is None)]
    outcomes = {name: RunnerOutcomes() for name in runners}
    flags: dict[str, set[str]] = {name: set() for name in runners}
    seen = 0
    for batch_index, (x, y) in enumerate(
        tqdm(batches, desc=f"validate {model_name}", leave=False, disable=None if progress else True)
    ):
        clean = _clean(model, runners, outcomes, flags, x, y, first=batch_index == 0)
        for spec, attack, cap in attacks:
            upto = len(x) if cap is None else max(min(cap - seen, len(x)), 0)
            if upto:
                _attack(spec, attack, model, runners, outcomes, clean, x[:upto], y[:upto])
        _corruptions(cfg, runners, outcomes, x, y, batch_index)
        seen += len(x)

    evaluations = []
    for name, runner in runners.items():
        specs = [spec for spec, _, _ in attacks]
        ev = _evaluation(model_name, runner, outcomes[name], flags[name], specs, cfg, model is not None)
        ev.skipped = skipped or None
        evaluations.append(ev)
    return evaluations


def _clean(
    model: nn.Module | None,
    runners: dict[str, Runner],
    outcomes: dict[str, RunnerOutcomes],
    flags: dict[str, set[str]],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    first: bool,
) -> dict[str | None, torch.Tensor]:
    """Clean predictions of every runner (parity against the model).

    Returns:
        Runtime name → which images it classifies correctly, and under ``None`` which ones
        the PyTorch model does (the images white-box attacks are crafted on).
    """
    reference = None
    clean: dict[str | None, torch.Tensor] = {}
    if model is not None:
        with torch.no_grad():
            reference = model(x).detach().float()
        clean[None] = correct(reference, y).cpu()
    outputs = {}
    for name, runner in runners.items():
        logits = outputs[name] = runner(x)
        outcomes[name].outputs(logits)
        clean[name] = correct(logits, y).cpu()
        outcomes[name].clean.append(clean[name])
        if reference is not None:
            outcomes[name].compare(logits, reference)
    if first:
        sanity.first_batch_flags(model, runners, x, y, outputs, flags)
    return clean


def _attack(
    spec: AttackSpec,
    attack: Attack,
    model: nn.Module | None,
    runners: dict[str, Runner],
    outcomes: dict[str, RunnerOutcomes],
    clean: dict[str | None, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
) -> None:
    """Run one attack on the first ``len(x)`` images of the batch and record who survived."""
    n = len(x)
    if spec.mode == "white-box":
        assert model is not None  # white-box attacks were dropped above without a model
        x_adv = attack(model, x, y).x_adv
        # Crafted on PyTorch's correctly classified images only: an image PyTorch gets wrong
        # was not attacked, so it never counts as robust on an engine either.
        attacked = clean[None][:n]
        for name, runner in runners.items():
            logits = runner(x_adv)
            outcomes[name].outputs(logits)
            robust = clean[name][:n] & attacked & correct(logits, y).cpu()
            outcomes[name].robust[spec.key].append(robust)
        return
    for name, runner in runners.items():
        result = attack(runner, x, y)
        logits = runner(result.x_adv)
        outcomes[name].outputs(logits)
        outcomes[name].robust[spec.key].append(clean[name][:n] & correct(logits, y).cpu())
        outcomes[name].queries[spec.key] += int(result.queries.sum()) if result.queries is not None else 0


def _corruptions(
    cfg: ValidateConfig,
    runners: dict[str, Runner],
    outcomes: dict[str, RunnerOutcomes],
    x: torch.Tensor,
    y: torch.Tensor,
    batch_index: int,
) -> None:
    corruption = cfg.corruptions
    for cname in corruption.names:
        for severity in corruption.severities:
            seed = corruption.seed * 1_000_003 + batch_index
            xc = corrupt(cname, x, severity, seed=seed)
            for name, runner in runners.items():
                logits = runner(xc)
                outcomes[name].outputs(logits)
                key = f"{cname}:{severity}"
                outcomes[name].corruption_correct[key] += int(correct(logits, y).sum())
                outcomes[name].corruption_seen[key] += len(y)


def _evaluation(
    model_name: str,
    runner: Runner,
    outcomes: RunnerOutcomes,
    flags: set[str],
    specs: list[AttackSpec],
    cfg: ValidateConfig,
    has_reference: bool,
) -> Evaluation:
    is_reference = runner.runtime == "torch"
    parity = outcomes.parity() if has_reference else None
    if parity is not None and not is_reference and parity.compared:
        flag = sanity.check_engine_agreement(parity.top1_agreement, runner.precision)
        if flag:
            flags.add(flag)
    flags |= black_box_flags(outcomes, specs)
    clean = outcomes.clean_correct()
    return Evaluation(
        model=model_name,
        runtime=runner.runtime,
        precision=runner.precision,
        device=runner.device,
        samples=len(clean),
        clean_accuracy=share(clean),
        corruptions=corruption_summary(
            outcomes, list(cfg.corruptions.names), list(cfg.corruptions.severities)
        ),
        attacks=attack_rows(outcomes, specs, is_reference),
        robust_accuracy=robust_accuracy(outcomes, specs),
        parity=parity,
        nonfinite_logits=outcomes.nonfinite_logits,
        flags=sorted(flags),
    )
