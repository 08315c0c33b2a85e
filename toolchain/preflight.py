"""Checks made before a run touches the disk: every name resolves, data and checkpoints load.

A bad recipe must fail fast with one clear line, and never after it has half-written (or
overwritten) a run directory.
"""

from __future__ import annotations

from torch import nn

from toolchain.data import DATASETS, DataBundle, load_data
from toolchain.errors import UserError
from toolchain.models import build_model, load_state_dict_file
from toolchain.recipe import Recipe


def check_names(recipe: Recipe) -> None:
    """Resolve every registry name the recipe uses (criterion, attacks, corruptions, runtimes).

    Raises:
        UnknownNameError: a name is not registered; the message lists the known ones.
        UserError: a runtime is requested whose library is not installed.
    """
    from exporters.runtimes import RUNTIMES, runtime_available
    from toolchain.pruning import CRITERIA
    from toolchain.robustness.attacks import ATTACKS
    from toolchain.robustness.corruptions import CORRUPTIONS

    DATASETS.get(recipe.data.dataset)
    CRITERIA.get(recipe.prune.criterion)
    for attack in recipe.validate.attacks:
        ATTACKS.get(attack.name)
    for name in recipe.validate.corruptions.names:
        CORRUPTIONS.get(name)
    for runtime in recipe.validate.runtimes:
        RUNTIMES.get(runtime)
        reason = runtime_available(runtime)
        if reason:
            raise UserError(f"validate.runtimes lists {runtime!r} but {reason}")


def check(recipe: Recipe) -> DataBundle:
    """Everything :func:`check_names` does, then load the data and build the model once.

    Returns:
        The loaded data (so the pipeline does not load it twice).
    """
    check_names(recipe)
    d = recipe.data
    data = load_data(
        d.dataset,
        root=d.root,
        image_size=d.image_size,
        train_samples=d.train_samples,
        val_samples=d.val_samples,
        seed=recipe.seed,
    )
    recipe_model(recipe, data)
    return data


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
    )
    if m.checkpoint:
        load_state_dict_file(model, m.checkpoint)
    return model
