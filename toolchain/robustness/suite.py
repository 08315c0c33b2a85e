"""The one evaluation engine: clean, corruptions, white-box, transfer and black-box attacks, on
every runner of a model, for any task.

One pass over the validation batches evaluates a model on all its runners at once, so work is
shared: corrupted images are generated once per batch and fed to every runner; white-box
adversarial examples are crafted once on the PyTorch model and replayed on every exported
engine (mode ``transfer``); black-box attacks run against each runner itself. The task decides
everything that depends on what a model predicts (:mod:`toolchain.tasks`): which images an
attack runs on, how outputs are scored, parity, and the report fields; one
:class:`~toolchain.tasks.Evaluator` per runner keeps only counters and small per-image records,
so memory does not grow with the images. Geometric corruptions move per-pixel labels with the
image when the task's labels are spatial.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from exporters.base import Runner
from toolchain.recipe import EvalAttackConfig, ValidateConfig
from toolchain.report.schema import Evaluation, Skipped
from toolchain.robustness import sanity
from toolchain.robustness.attacks import ATTACKS, Attack, build_attack
from toolchain.robustness.corruptions import corrupt, corrupt_labels
from toolchain.tasks import AttackSpec, Evaluator, Task, task_named, task_of

log = logging.getLogger(__name__)

__all__ = ["build_suite_attacks", "evaluate", "parity_craft"]


def attack_from(cfg: EvalAttackConfig, task: str | None, **override: Any) -> Attack:
    """The attack a recipe entry describes, built for ``task`` (the one place recipe attack
    options become an attack); ``override`` replaces options (e.g. ``steps``)."""
    options = {
        "eps": cfg.eps,
        "norm": cfg.norm,
        "steps": cfg.steps,
        "step_size": cfg.step_size,
        "restarts": cfg.restarts,
        "queries": cfg.queries,
        "targets": cfg.targets,
        "seed": cfg.seed,
        **override,
    }
    return build_attack(cfg.name, task=task, **options)


def build_suite_attacks(cfgs: Sequence[EvalAttackConfig], task: str) -> list[tuple[AttackSpec, Attack]]:
    """The attacks of a validate section for ``task``, ensembles expanded into their parts.

    Raises:
        UnknownNameError, UserError: an unknown name, invalid options, or an attack that is not
            defined for the task (the message names those that are).
    """
    built = []
    for i, cfg in enumerate(cfgs):
        attack = attack_from(cfg, task)
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
                samples=cfg.samples,
            )
            built.append((spec, part))
    return built


def parity_craft(model: nn.Module, cfg: ValidateConfig) -> Callable[[torch.Tensor, Any], torch.Tensor] | None:
    """``(x, y) -> x_adv``: the adversarial inputs INT8 files are compared with their FP32 file
    on: PGD on the model's task, at the budget (eps, norm, step size) of the first white-box
    attack of ``cfg.attacks`` the task supports, with its steps (10 when unset), seeded by the
    corruption seed; None when there is none."""
    task = task_of(model)
    white = next(
        (
            a
            for a in cfg.attacks
            if a.name in ATTACKS
            and ATTACKS.get(a.name).mode == "white-box"
            and task.name in ATTACKS.get(a.name).tasks
        ),
        None,
    )
    if white is None:
        return None
    options: dict[str, Any] = {"eps": white.eps, "steps": max(white.steps or 10, 1), "norm": white.norm}
    if white.step_size is not None:
        options["step_size"] = white.step_size
    pgd = build_attack("pgd", seed=cfg.corruptions.seed, task=task.name, **options)
    return lambda x, y: pgd(model.eval(), x, y).x_adv


def evaluate(
    model: nn.Module | None,
    runners: Mapping[str, Runner],
    batches: Iterable[tuple[torch.Tensor, Any]],
    cfg: ValidateConfig,
    *,
    task: str | Task | None = None,
    model_name: str,
    class_names: Sequence[str] = (),
    progress: bool = True,
) -> list[Evaluation]:
    """Run the validate section on one model and each of its runners.

    Args:
        model: the PyTorch model the runners were made from: white-box attacks are crafted on
            it, and it is the parity reference. ``None`` for a bare engine (a user's own ONNX
            file): white-box and transfer attacks are then skipped and listed as such.
        runners: runtime name -> runner; parity is measured against ``model`` on each.
        batches: validation ``(x, y)`` batches, ``x`` in [0, 1], ``y`` as the task's data gives.
        cfg: the recipe's validate section.
        task: the task (name or object); default the model's, else classification.
        model_name: ``"dense"`` or ``"pruned"`` (written into each evaluation).
        class_names: one name per class, in output order (needed by per-pixel tasks).

    Returns:
        One evaluation per runner (report.json's ``evaluations[]`` records).
    """
    task = _task(task, model)
    if model is not None:
        model.eval()
    attacks = build_suite_attacks(list(cfg.attacks), task.name)
    not_run = [spec for spec, _ in attacks if spec.mode == "white-box" and model is None]
    skipped = [
        Skipped(name=spec.name, reason="white-box attacks need the PyTorch model; only black-box ones run")
        for spec in not_run
    ]
    attacks = [item for item in attacks if not (item[0].mode == "white-box" and model is None)]
    evaluators = {name: task.evaluator(class_names) for name in runners}
    flags: dict[str, set[str]] = {name: set() for name in runners}
    seen = 0
    bar = tqdm(batches, desc=f"validate {model_name}", leave=False, disable=None if progress else True)
    for batch_index, (x, y) in enumerate(bar):
        reference = _clean(task, model, runners, evaluators, flags, x, y, first=batch_index == 0)
        for spec, attack in attacks:
            upto = len(x) if spec.samples is None else max(min(spec.samples - seen, len(x)), 0)
            if upto:
                _attack(task, spec, attack, model, runners, evaluators, reference, x[:upto], y[:upto])
        _corruptions(task, cfg, runners, evaluators, x, y, batch_index)
        seen += len(x)
    specs = [spec for spec, _ in attacks]
    return [
        _missing(
            _evaluation(
                model_name, runner, evaluators[name], flags[name], specs, cfg, model is not None, skipped
            ),
            not_run,
        )
        for name, runner in runners.items()
    ]


def _task(task: str | Task | None, model: nn.Module | None) -> Task:
    if isinstance(task, Task):
        return task
    if task is None and model is not None:
        return task_of(model)
    return task_named(task)


def _clean(
    task: Task,
    model: nn.Module | None,
    runners: Mapping[str, Runner],
    evaluators: dict[str, Evaluator],
    flags: dict[str, set[str]],
    x: torch.Tensor,
    y: Any,
    *,
    first: bool,
) -> Any:
    """Clean outputs of every runner, with parity against the model; returns the model's clean
    output (None without a model)."""
    reference = None
    if model is not None:
        with torch.no_grad():
            reference = _detach(model(x))
    outputs = {}
    for name, runner in runners.items():
        out = outputs[name] = runner(x)
        evaluators[name].clean(out, y)
        if reference is not None:
            evaluators[name].compare(out, reference)
    if first:
        sanity.first_batch_flags(model, runners, x, y, outputs, flags)
    return reference


def _detach(out: Any) -> Any:
    if isinstance(out, tuple | list):
        return type(out)(t.detach().float() for t in out)
    return out.detach().float()


def _attack(
    task: Task,
    spec: AttackSpec,
    attack: Attack,
    model: nn.Module | None,
    runners: Mapping[str, Runner],
    evaluators: dict[str, Evaluator],
    reference: Any,
    x: torch.Tensor,
    y: Any,
) -> None:
    """Run one attack on the first ``len(x)`` images of the batch and score every runner."""
    n = len(x)
    if spec.mode == "white-box":
        assert model is not None and reference is not None  # dropped above without a model
        x_adv = attack(model, x, y).x_adv
        # Crafted on the images the PyTorch model's task attacks: an image it did not attack
        # there is never robust on an engine either.
        crafted_on = task.objective.attackable(_first(reference, n), y).cpu()
        for name, runner in runners.items():
            evaluators[name].attacked(spec, runner(x_adv), y, crafted_on, 0)
        return
    for name, runner in runners.items():
        result = attack(runner, x, y)
        queries = int(result.queries.sum()) if result.queries is not None else 0
        evaluators[name].attacked(spec, runner(result.x_adv), y, None, queries)


def _first(out: Any, n: int) -> Any:
    if isinstance(out, tuple | list):
        return type(out)(t[:n] for t in out)
    return out[:n]


def _corruptions(
    task: Task,
    cfg: ValidateConfig,
    runners: Mapping[str, Runner],
    evaluators: dict[str, Evaluator],
    x: torch.Tensor,
    y: Any,
    batch_index: int,
) -> None:
    corruption = cfg.corruptions
    for cname in corruption.names:
        for severity in corruption.severities:
            seed = corruption.seed * 1_000_003 + batch_index
            xc = corrupt(cname, x, severity, seed=seed)
            # Labels located in the image move with it (segmentation's label map, nearest).
            yc = corrupt_labels(cname, y, x, severity, seed) if _label_map(task, y) else y
            for name, runner in runners.items():
                evaluators[name].corrupted(f"{cname}:{severity}", runner(xc), yc)


def _label_map(task: Task, y: Any) -> bool:
    """Labels that are one class per pixel: a warp of the image must warp them too."""
    return task.spatial_labels and isinstance(y, torch.Tensor) and y.dim() == 3


def _evaluation(
    model_name: str,
    runner: Runner,
    evaluator: Evaluator,
    flags: set[str],
    specs: list[AttackSpec],
    cfg: ValidateConfig,
    has_reference: bool,
    skipped: list[Skipped],
) -> Evaluation:
    is_reference = runner.runtime == "torch"
    common = {
        "model": model_name,
        "runtime": runner.runtime,
        "precision": runner.precision,
        "device": runner.device,
    }
    ev = evaluator.evaluation(common, specs, cfg, is_reference=is_reference, has_reference=has_reference)
    if ev.parity is not None and not is_reference and ev.parity.compared:
        flag = sanity.check_engine_agreement(ev.parity.top1_agreement, runner.precision)
        if flag:
            flags.add(flag)
    flags |= _black_box_flags(evaluator, specs)
    ev.flags = sorted(flags)
    ev.skipped = skipped or None
    return ev


def _missing(ev: Evaluation, not_run: list[AttackSpec]) -> Evaluation:
    """Record in each per-budget worst case (robust accuracy, mIoU or mAP) the recipe's attacks
    at that budget that did not run, so that it is never read as the recipe's worst case."""
    for field in ("robust_accuracy", "robust_miou", "robust_map"):
        for row in getattr(ev, field, None) or []:
            names = sorted({s.name for s in not_run if (s.norm, s.eps) == (row.norm, row.eps)})
            row.missing = names or None
    return ev


def _black_box_flags(evaluator: Evaluator, specs: list[AttackSpec]) -> set[str]:
    """``black-box-stronger-than-white-box``, like with like: per budget, black-box attacks
    against the per-image worst case of the white-box (or transfer) attacks at the same norm
    and eps, on the images both saw (tasks with a per-image verdict only)."""
    groups: dict[tuple[str, float], list[tuple[AttackSpec, torch.Tensor]]] = defaultdict(list)
    for spec in specs:
        mask = evaluator.survived(spec.key)
        if mask is not None and len(mask):
            groups[(spec.norm, spec.eps)].append((spec, mask))
    flags: set[str] = set()
    for ran in groups.values():
        white = [m for s, m in ran if s.mode == "white-box"]
        black = [m for s, m in ran if s.mode == "black-box"]
        if not white or not black:
            continue
        common = min(len(m) for _, m in ran)
        flag = sanity.check_black_box_stronger(_all(white, common), _all(black, common))
        if flag:
            flags.add(flag)
    return flags


def _all(masks: list[torch.Tensor], upto: int) -> torch.Tensor:
    robust = torch.ones(upto, dtype=torch.bool)
    for mask in masks:
        robust &= mask[:upto]
    return robust
