"""``robustprune select``: choose the pruning method and fine-tuning loss by measurement, on
images held out from the training split.

Which method and loss keep most robustness at a budget depends on the data (the benchmarks
say so), so the choice is measured: the recipe's dense model is trained once, then every
candidate (``prune.method`` x ``finetune.loss``) prunes a copy of it to the recipe's budget,
fine-tunes it with the recipe's ``finetune`` section (``ard``/``rslad`` learn from the dense
model), and is scored on ``data.holdout``: clean accuracy and accuracy under the recipe's first
``validate`` attack. The test split is never evaluated; the recipe must set ``data.holdout``.
The chosen candidate is the one that meets the budget with the highest robust accuracy (ties:
clean accuracy); every candidate's numbers are recorded, the chosen one's recipe keys too.
"""

from __future__ import annotations

import copy
import itertools
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from toolchain import preflight
from toolchain.data import DataBundle
from toolchain.errors import UserError
from toolchain.pruning import prune_model
from toolchain.recipe import Recipe, recipe_from_dict
from toolchain.robustness.suite import attack_from
from toolchain.tasks import task_of
from toolchain.training import train_model
from toolchain.training.loops import make_loader

log = logging.getLogger(__name__)

#: The fine-tuning losses tried when none are named: plain PGD-AT and the two distillations.
DEFAULT_LOSSES = ("pgd", "ard", "rslad")


@dataclass
class Candidate:
    """One candidate's record. ``clean`` and ``robust`` are accuracies on the held-out images."""

    method: str
    loss: str
    macs_reduction: float
    target_met: bool
    clean: float
    robust: float
    seconds: float


def select(
    recipe: Recipe, methods: Sequence[str] = (), losses: Sequence[str] = (), *, progress: bool = True
) -> dict[str, Any]:
    """Try every (method, loss) pair on ``recipe`` and pick the best on held-out images.

    Args:
        recipe: a validated recipe with ``data.holdout`` set.
        methods: ``prune.method`` names to try (default: the recipe's own).
        losses: ``finetune.loss`` names to try (default: pgd, ard, rslad).

    Returns:
        The record: ``holdout``, ``attack``, ``dense`` (clean/robust), ``candidates`` (every
        one, in the order tried) and ``chosen`` (method, loss and the recipe keys to set), or
        ``chosen: None`` if no candidate met the budget.

    Raises:
        UserError: no ``data.holdout``, or a method or loss the recipe cannot take.
    """
    if recipe.data.holdout is None:
        raise UserError(
            "select chooses on images held out from the training split and never on the test split: "
            "set data.holdout (e.g. --set data.holdout=1000)"
        )
    pairs = list(itertools.product(methods or [recipe.prune.method], losses or DEFAULT_LOSSES))
    variants = [_variant(recipe, method, loss) for method, loss in pairs]
    for variant in variants:  # bad names and settings fail here, before any training
        preflight.check_names(variant)
    data = preflight.check(recipe)
    dense = _dense(recipe, data, progress)
    attack = recipe.validate.attacks[0]
    record: dict[str, Any] = {
        "recipe": recipe.name,
        "holdout": recipe.data.holdout,
        "budget": recipe.prune.target.as_dict(),
        "attack": attack.model_dump(mode="json"),
        "dense": dict(zip(("clean", "robust"), _score(recipe, dense, data))),
        "candidates": [],
    }
    for (method, loss), variant in zip(pairs, variants):
        candidate = _try(variant, dense, data, progress)
        log.info("select: %s + %s: clean %.4f robust %.4f", method, loss, candidate.clean, candidate.robust)
        record["candidates"].append(asdict(candidate))
    record["chosen"] = best(record["candidates"])
    return record


def best(candidates: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """The candidate that met the budget with the highest robust (then clean) accuracy, as the
    recipe keys that select it; None if none met the budget."""
    met = [c for c in candidates if c["target_met"]]
    if not met:
        return None
    top = max(met, key=lambda c: (c["robust"], c["clean"]))
    keys = [f"prune.method={top['method']}", f"finetune.loss={top['loss']}"]
    return {"method": top["method"], "loss": top["loss"], "set": keys}


def _variant(recipe: Recipe, method: str, loss: str) -> Recipe:
    raw = recipe.model_dump(mode="json", exclude_unset=True)  # what the user wrote: it validates again
    raw.setdefault("prune", {})["method"] = method
    raw.setdefault("finetune", {})["loss"] = loss
    return recipe_from_dict(raw, source=f"candidate {method} + {loss}")


def _loader(recipe: Recipe, data: DataBundle, offset: int) -> torch.utils.data.DataLoader:
    return make_loader(
        data.train, recipe.data.batch_size, shuffle=True, seed=recipe.seed + offset, collate_fn=data.collate
    )


def _dense(recipe: Recipe, data: DataBundle, progress: bool) -> nn.Module:
    torch.manual_seed(recipe.seed)
    model = preflight.recipe_model(recipe, data)
    train_model(
        model, _loader(recipe, data, 0), recipe.train, seed=recipe.seed, desc="dense", progress=progress
    )
    return model.eval()


def _try(recipe: Recipe, dense: nn.Module, data: DataBundle, progress: bool) -> Candidate:
    started = time.perf_counter()
    torch.manual_seed(recipe.seed)
    model = copy.deepcopy(dense)
    example = torch.zeros(1, data.channels, *data.input_hw)
    job = preflight.prune_job(recipe, model, example, lambda offset: _loader(recipe, data, offset), progress)
    job.teacher = dense
    result = prune_model(model, job, recipe.prune)
    pruned = result.model
    train_model(
        pruned,
        _loader(recipe, data, 2),
        recipe.finetune,
        seed=recipe.seed + 100,
        desc="finetune",
        progress=progress,
        teacher=dense,
    )
    clean, robust = _score(recipe, pruned.eval(), data)
    return Candidate(
        recipe.prune.method,
        recipe.finetune.loss,
        result.macs_reduction,
        result.target_met,
        clean,
        robust,
        round(time.perf_counter() - started, 1),
    )


def _score(recipe: Recipe, model: nn.Module, data: DataBundle) -> tuple[float, float]:
    """Clean and robust accuracy (pixel accuracy for segmentation) on the held-out images
    (``data.val`` is the holdout when ``data.holdout`` is set), capped at ``validate.samples``."""
    attack = attack_from(recipe.validate.attacks[0], recipe.task)
    task = task_of(model)
    size = recipe.validate.batch_size
    count = min(recipe.validate.samples, len(data.val))  # type: ignore[arg-type]
    loader = make_loader(
        torch.utils.data.Subset(data.val, range(count)), size, shuffle=False, collate_fn=data.collate
    )
    seen = clean = robust = 0
    for x, y in loader:
        x_adv = attack(model, x, y).x_adv
        with torch.no_grad():
            right, counted = task.hits(model(x), y)
            adv_right, _ = task.hits(model(x_adv), y)
        seen, clean, robust = seen + counted, clean + right, robust + adv_right
    return clean / max(seen, 1), robust / max(seen, 1)
