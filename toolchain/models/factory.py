"""Building a model from an architecture name, and rebuilding it from its spec dict."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from toolchain.errors import UserError
from toolchain.models.base import MODELS, Normalize, NormalizedClassifier, zoo_task
from toolchain.models.external import TORCHVISION_PREFIX, torchvision_net, torchvision_task, user_net
from toolchain.tasks import DEFAULT_TASK, task_named

log = logging.getLogger(__name__)

SPEC_KEYS = ("arch", "num_classes", "in_channels", "mean", "std", "image_size", "width")
#: Spec keys that files written before they existed may lack (default in brackets): ``task``
#: (``classification``), the task the model predicts for (:mod:`toolchain.tasks`).
OPTIONAL_SPEC_KEYS = ("task",)
_RGB = 3  # what torchvision classifiers take


def model_spec(
    arch: str,
    *,
    num_classes: int,
    in_channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    image_size: int = 32,
    width: float = 1.0,
    task: str = DEFAULT_TASK,
) -> dict[str, Any]:
    """The validated, JSON-serialisable description that :func:`build_from_spec` rebuilds.

    Args: as :func:`build_model`.

    Returns:
        ``{"arch", "num_classes", "in_channels", "mean", "std", "image_size", "width"}``, plus
        ``"task"`` for any task but classification (so classification specs stay as they were).

    Raises:
        UserError: a value is out of range or mean/std do not have one value per channel.
    """
    if not isinstance(arch, str) or not arch:
        raise UserError(f"model arch must be a non-empty string, got {arch!r}")
    counts = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size}
    for key, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"model {key} must be a positive integer, got {value!r}")
    if not (isinstance(width, int | float) and math.isfinite(width) and width > 0):
        raise UserError(f"model width must be a positive number, got {width!r}")
    mean, std = [float(m) for m in mean], [float(s) for s in std]
    if len(mean) != in_channels or len(std) != in_channels:
        raise UserError(
            f"mean and std need one value per input channel ({in_channels}); got {len(mean)} and {len(std)}"
        )
    if not all(math.isfinite(s) and s > 0 for s in std) or not all(math.isfinite(m) for m in mean):
        raise UserError(f"std must be positive and mean finite; got mean={mean}, std={std}")
    task_named(task)  # an unknown task is an error that lists the known ones
    extra = {} if task == DEFAULT_TASK else {"task": task}
    return {
        "arch": arch,
        "num_classes": num_classes,
        "in_channels": in_channels,
        "mean": mean,
        "std": std,
        "image_size": image_size,
        "width": float(width),
        **extra,
    }


def build_model(
    arch: str,
    *,
    num_classes: int,
    in_channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    image_size: int = 32,
    width: float = 1.0,
    task: str = DEFAULT_TASK,
) -> NormalizedClassifier:
    """Build ``net(normalize(x))`` for [0, 1] pixel input; weights follow the global torch seed.

    Args:
        arch: a zoo name (``MODELS.names()``), ``torchvision:<name>`` (random init) or
            ``package.module:callable`` (a factory you wrote; see ``external.user_net``).
        num_classes: logits per image.
        in_channels: image channels. Gray input to a torchvision model is repeated to 3
            channels inside the ``Normalize`` layer, so exports still take 1 channel.
        mean, std: per-channel input statistics in [0, 1] units (``DataBundle.mean/std``).
        image_size: input side; zoo models accept any size >= 8 (global pooling), but user
            factories are checked with one forward pass at this size.
        width: channel multiplier; only zoo models use it.
        task: what the model predicts (``classification`` or ``segmentation``); recorded in the
            spec, where losses, attacks and metrics read it (:func:`toolchain.tasks.task_of`).

    Returns:
        A :class:`NormalizedClassifier` with ``.normalize``, ``.net`` and ``.spec``.

    Raises:
        UnknownNameError: unknown zoo or torchvision name; the message lists the known ones.
        UserError: bad arguments, or a user factory that cannot be imported or does not fit.
    """
    spec = model_spec(
        arch,
        num_classes=num_classes,
        in_channels=in_channels,
        mean=mean,
        std=std,
        image_size=image_size,
        width=width,
        task=task,
    )
    return build_from_spec(spec, trusted=(arch,))


def build_from_spec(spec: Mapping[str, Any], *, trusted: Collection[str] = ()) -> NormalizedClassifier:
    """Rebuild the architecture ``spec`` describes (fresh weights; load a state_dict after).

    A spec read from a file is data, not an instruction to run code: a ``module:callable``
    architecture is imported only if the caller names it in ``trusted`` (the factory the user
    put in the recipe or on the command line). Zoo and ``torchvision:`` names are always built.

    Args:
        spec: a dict from :func:`model_spec` or ``model.spec`` (for example read from JSON).
        trusted: ``module:callable`` factories the user asked for.

    Returns:
        The model; its state_dict has the same keys and shapes as the one ``spec`` came from.

    Raises:
        UserError: a key is missing or unknown, a value is invalid, or the spec names a
            factory that is not trusted.
        UnknownNameError: as :func:`build_model`.
    """
    missing = [k for k in SPEC_KEYS if k not in spec]
    unknown = sorted(set(spec) - set(SPEC_KEYS) - set(OPTIONAL_SPEC_KEYS))
    if missing or unknown:
        raise UserError(
            f"model spec: missing keys {missing}, unknown keys {unknown}; expected {list(SPEC_KEYS)}"
        )
    spec = model_spec(
        spec["arch"],
        **{k: spec[k] for k in SPEC_KEYS[1:]},
        **{k: spec[k] for k in OPTIONAL_SPEC_KEYS if k in spec},
    )
    arch, num_classes, in_channels = spec["arch"], spec["num_classes"], spec["in_channels"]
    repeat = 1
    if arch.startswith(TORCHVISION_PREFIX):
        name = arch.removeprefix(TORCHVISION_PREFIX)
        net = torchvision_net(name, num_classes=num_classes, image_size=spec["image_size"])
        if in_channels == 1:
            repeat = _RGB
        elif in_channels != _RGB:
            raise UserError(f"{arch} takes 3-channel (or gray) images; the data has {in_channels} channels")
    elif ":" in arch:
        if arch not in trusted:
            raise UserError(
                f"the model file names the factory {arch!r}, which this run did not ask for; only zoo, "
                "torchvision: and the recipe's own model.arch are built (code a file names is never imported)"
            )
        net = user_net(
            arch,
            num_classes=num_classes,
            in_channels=in_channels,
            image_size=spec["image_size"],
            task=spec.get("task", DEFAULT_TASK),
        )
    else:
        net = MODELS.get(arch)(num_classes=num_classes, in_channels=in_channels, width=spec["width"])
    converted = unfreeze_batchnorm(net)
    if converted:
        log.info(
            "%s: %d FrozenBatchNorm2d layer(s) became BatchNorm2d with the same statistics "
            "(torch-pruning cannot prune frozen BatchNorm)",
            arch,
            converted,
        )
    if spec["width"] != 1.0 and arch not in MODELS:
        log.warning("model width=%s is ignored by %s (only zoo models scale channels)", spec["width"], arch)
    return NormalizedClassifier(Normalize(spec["mean"], spec["std"], repeat=repeat), net, spec)


def unfreeze_batchnorm(model: nn.Module) -> int:
    """Replace torchvision's ``FrozenBatchNorm2d`` layers (detection backbones of pretrained
    models, a user's factory) by ``BatchNorm2d`` with the same weight, bias, statistics and eps,
    so torch-pruning can prune them and training can update them; returns how many.
    """
    from torchvision.ops.misc import FrozenBatchNorm2d

    frozen = [(name, m) for name, m in model.named_modules() if isinstance(m, FrozenBatchNorm2d)]
    for name, old in frozen:
        new = nn.BatchNorm2d(old.weight.shape[0], eps=old.eps)
        with torch.no_grad():
            new.weight.copy_(old.weight)
            new.bias.copy_(old.bias)
            new.running_mean.copy_(old.running_mean)  # type: ignore[union-attr]  # tracked stats
            new.running_var.copy_(old.running_var)  # type: ignore[union-attr]
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return len(frozen)


def arch_task(arch: str) -> str:
    """The task an architecture name is built for: a zoo model's own, a torchvision model's
    (detection, segmentation or classification), classification for a user factory (its
    recipe's ``task`` says otherwise)."""
    if arch.startswith(TORCHVISION_PREFIX):
        return torchvision_task(arch.removeprefix(TORCHVISION_PREFIX))
    if arch in MODELS:
        return zoo_task(arch)
    return DEFAULT_TASK


def trusted_builder(recipe: Any) -> Callable[[Mapping[str, Any]], NormalizedClassifier]:
    """``build_from_spec`` that trusts only the factory ``recipe.model.arch`` names, for loading
    model files (yours or someone else's run directory)."""
    trusted = (recipe.model.arch,)
    return lambda spec: build_from_spec(spec, trusted=trusted)
