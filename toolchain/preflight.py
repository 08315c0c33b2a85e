"""Checks made before a run touches the disk: every name resolves, data and checkpoints load.

A bad recipe must fail fast with one clear line, and never after it has half-written (or
overwritten) a run directory.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from toolchain.data import DATASETS, DataBundle, load_data
from toolchain.device import resolve_device
from toolchain.errors import UserError
from toolchain.models import build_model, load_state_dict_file
from toolchain.pruning.budget import Budget
from toolchain.pruning.graph import classifier_layers, protected_layers
from toolchain.pruning.masks import ChannelMasks
from toolchain.pruning.methods import METHODS, PruneJob, check_sections, method_settings
from toolchain.pruning.prunability import check_forward, report
from toolchain.pruning.structure import analyse
from toolchain.recipe import PruneConfig, Recipe, TrainConfig
from toolchain.robustness.corruptions import CORRUPTIONS
from toolchain.robustness.suite import build_suite_attacks
from toolchain.tasks import task_named

log = logging.getLogger(__name__)


def check_names(recipe: Recipe) -> None:
    """Resolve every registry name the recipe uses (criterion, attacks, corruptions, runtimes).

    Raises:
        UnknownNameError: a name is not registered; the message lists the known ones.
        UserError: a runtime or attack is requested whose library is not installed, or an
            attack's options are invalid.
    """
    from exporters.runtimes import RUNTIMES, runtime_available
    from toolchain.pruning import CRITERIA
    from toolchain.robustness.corruptions import CORRUPTIONS

    DATASETS.get(recipe.data.dataset)
    task = task_named(recipe.task)
    # Built, not only looked up: bad options, a missing optional package or an attack the task
    # does not define fail here, before anything is written.
    build_suite_attacks(list(recipe.validate.attacks), recipe.task)
    CRITERIA.get(recipe.prune.criterion)
    check_sections(recipe.prune)
    for name in recipe.validate.corruptions.names:
        CORRUPTIONS.get(name)
        if name in task.refused_corruptions:
            raise UserError(
                f"validate.corruptions: {name!r} cannot be scored for task {task.name} "
                f"({task.refused_corruptions[name]}); remove it"
            )
    if recipe.export.end_to_end and not task.post_processes_in_graph:
        raise UserError(
            f"export.end_to_end: task {task.name} has no post-processing to put in the graph "
            "(only detection has); remove it"
        )
    quantize = recipe.quantize
    if quantize.enabled:
        for name in quantize.corruptions:
            CORRUPTIONS.get(name)
    wants_tensorrt = "tensorrt" in recipe.validate.runtimes or (
        recipe.bench.enabled and "tensorrt" in recipe.bench.runtimes
    )
    int8_source = quantize.enabled and "tensorrt" in quantize.targets
    if wants_tensorrt and "int8" in recipe.engine.precisions and not int8_source:
        raise UserError(
            "engine.precisions lists int8, which TensorRT builds from a Q/DQ file: "
            "set quantize.enabled: true and add tensorrt to quantize.targets"
        )
    for section, runtimes in (("validate", recipe.validate.runtimes), ("bench", recipe.bench.runtimes)):
        if section == "bench" and not recipe.bench.enabled:
            continue
        for runtime in runtimes:
            RUNTIMES.get(runtime)
            reason = runtime_available(runtime)
            if reason:
                raise UserError(f"{section}.runtimes lists {runtime!r} but {reason}")


def check(recipe: Recipe) -> DataBundle:
    """Everything :func:`check_names` does, then load the data and build the model once.

    Returns:
        The loaded data (so the pipeline does not load it twice).
    """
    check_names(recipe)
    resolve_device(recipe.device)
    for section in train_sections(recipe):
        for name in section.mixed.corruptions if section.loss == "mixed" else []:
            CORRUPTIONS.get(name)
        distils = section.loss in ("ard", "rslad") and section.distill.corruption_weight > 0
        for name in section.distill.corruptions if distils else []:
            CORRUPTIONS.get(name)
    d = recipe.data
    data = load_data(
        d.dataset,
        root=d.root,
        image_size=d.image_size,
        train_samples=d.train_samples,
        val_samples=d.val_samples,
        seed=recipe.data_seed,
        holdout=d.holdout,
        task=recipe.task,
    )
    if data.task != recipe.task:
        raise UserError(
            f"dataset {d.dataset!r} has {data.task} labels but the recipe's task is {recipe.task!r}; "
            f"set task: {data.task} (or use a {recipe.task} dataset)"
        )
    check_attack_classes(recipe, data.num_classes)
    model = recipe_model(recipe, data)
    example = _example(data)
    with torch.no_grad():
        out = model.eval()(example)
    task_named(recipe.task).check_output(out, data.num_classes, example)
    check_prunable(recipe, model, data)
    return data


def check_attack_classes(recipe: Recipe, num_classes: int) -> None:
    """Refuse, before any training, an attack the data's class count cannot run (APGD-T needs
    4 classes; so does autoattack-lite, which runs it).

    Raises:
        UserError: names the attack (and the ensemble it belongs to) and the class count.
    """
    for spec, attack in build_suite_attacks(list(recipe.validate.attacks), recipe.task):
        if num_classes >= attack.min_classes:
            continue
        which = f"{spec.ensemble!r} (its part {spec.name!r})" if spec.ensemble else repr(spec.name)
        raise UserError(
            f"validate.attacks: {which} needs a model with at least {attack.min_classes} classes "
            f"({attack.min_classes_why}), dataset {recipe.data.dataset!r} has {num_classes}; "
            "use 'apgd' instead"
        )


def train_sections(recipe: Recipe) -> list[TrainConfig]:
    """Every training loop the recipe configures (dense, between steps, in-loop, fine-tune)."""
    sections = [recipe.train, recipe.prune.finetune_between, recipe.finetune]
    own = getattr(method_settings(recipe.prune), "train", None)
    return sections if own is None else [*sections, own]


def _example(data: DataBundle) -> torch.Tensor:
    return torch.zeros(1, data.channels, *data.input_hw)


def check_prunable(recipe: Recipe, model: nn.Module, data: DataBundle) -> None:
    """Before training: the model runs, the method accepts it (masks, reachable budget), and
    the model still runs with every group pruned to its floor. What pruning will leave alone is
    logged as warnings.

    Raises:
        BudgetError: even every layer at its ``max_layer_pruning`` floor misses the target.
        UserError: the model fails a forward pass (before or after pruning; the module is named),
            or a layer consumes channels in a way masks cannot express (it is named).
    """
    example = _example(data)
    check_forward(model, example, what=f"model {recipe.model.arch}")
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    if frozen:
        shown = ", ".join(frozen[:3]) + (f" and {len(frozen) - 3} more" if len(frozen) > 3 else "")
        log.warning(
            "%s: %d parameter tensor(s) are frozen (requires_grad=False: %s): pruning scores and removes "
            "their channels like any others, training leaves their values as they are",
            recipe.model.arch,
            len(frozen),
            shown,
        )
    structure = analyse(model, example)
    heads = classifier_layers(model, example)
    protected = _union([*heads, *structure.training_only], kept_layers(recipe.prune, model, example))
    masks = ChannelMasks(
        model, example, protected, max_layer_pruning=recipe.prune.max_layer_pruning, strict=False
    )
    for line in report(masks, heads, recipe.prune.round_to).warnings():
        log.warning("%s: %s", recipe.model.arch, line)
    method = METHODS.get(recipe.prune.method)(recipe.prune)
    method.check(model, example, protected, budget_of(recipe.prune))  # incl. the removal check


def kept_layers(cfg: PruneConfig, model: nn.Module, example_inputs: torch.Tensor) -> list[nn.Module]:
    """The layers whose output channels pruning never touches: the head(s), found by tracing,
    and the recipe's ``prune.ignored_layers``.

    Raises:
        UserError: a name in ``prune.ignored_layers`` is not a layer of the model.
    """
    modules = dict(model.named_modules())
    for name in cfg.ignored_layers:
        if name not in modules or name == "":
            close = difflib.get_close_matches(name, [n for n in modules if n], n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; names look like net.conv1"
            raise UserError(f"prune.ignored_layers: the model has no layer {name!r}{hint}")
    heads = classifier_layers(model, example_inputs)
    return [*heads, *(modules[n] for n in cfg.ignored_layers if modules[n] not in heads)]


def budget_of(cfg: PruneConfig) -> Budget:
    """The recipe's budget as the pruning library takes it.

    A latency target is handed over as the same factor of MACs: the prune stage replaces it by
    the MACs reduction its latency search measures (:mod:`toolchain.pruning.latency_target`).
    """
    metric = "macs" if cfg.target.metric == "latency" else cfg.target.metric
    return Budget(metric, cfg.target.reduction, cfg.tolerance, cfg.round_to, cfg.max_layer_pruning)


def prune_job(
    recipe: Recipe,
    model: nn.Module,
    example_inputs: torch.Tensor,
    loader: Callable[[int], DataLoader],
    progress: bool,
) -> PruneJob:
    """What the prune stage hands to the method (the head of ``model`` and its training-only
    modules keep their output channels)."""
    return PruneJob(
        example_inputs=example_inputs,
        budget=budget_of(recipe.prune),
        ignored_layers=_union(
            protected_layers(model, example_inputs), kept_layers(recipe.prune, model, example_inputs)
        ),
        loader=loader,
        attack=recipe.prune.attack,
        seed=recipe.seed,
        progress=progress,
    )


def recipe_model(recipe: Recipe, data: DataBundle) -> nn.Module:
    """The recipe's model for this data, with its checkpoint loaded if the recipe names one.

    Raises:
        UnknownNameError: the architecture is unknown.
        CheckpointError: the checkpoint is missing or does not fit the architecture.
    """
    m = recipe.model
    model = build_model(
        m.arch,
        num_classes=data.num_classes,
        in_channels=data.channels,
        mean=data.mean,
        std=data.std,
        image_size=data.image_size,
        width=m.width,
        task=recipe.task,
    )
    if m.checkpoint:
        load_state_dict_file(model, m.checkpoint)
    return model


def _union(first: list[nn.Module], second: list[nn.Module]) -> list[nn.Module]:
    """``first`` then the modules of ``second`` not in it (modules compare by identity)."""
    seen = {id(m) for m in first}
    return [*first, *(m for m in second if id(m) not in seen)]
