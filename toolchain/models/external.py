"""Networks from outside the zoo: ``torchvision:<name>`` and ``package.module:callable``.

The ``module:callable`` form is the one place in robustprune that imports code named by a
recipe, and only because the user asked for exactly that module. torchvision is imported
here, lazily, so ``import toolchain.models`` stays light.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from toolchain.errors import UnknownNameError, UserError
from toolchain.tasks import DEFAULT_TASK, task_named

TORCHVISION_PREFIX = "torchvision:"


class DenseOutput(nn.Module):
    """A torchvision segmentation model returning its ``"out"`` logits (``N x K x H x W``, at
    the input resolution) instead of a dict, as robustprune's runners and exports expect."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


#: torchvision classifiers built for one input size: the keyword that sets it, and which sizes work.
_FIXED_SIZE = {
    "vit_": ("image_size", "a multiple of the patch size"),
    "maxvit_": ("input_size", "a multiple of 224"),
}


def torchvision_net(name: str, *, num_classes: int, image_size: int | None = None) -> nn.Module:
    """``torchvision.models.get_model(name, weights=None, num_classes=num_classes)``.

    torchvision models expect 3 input channels; the caller adapts gray input. Models built
    for one input size (ViT, MaxViT) are built for ``image_size``. Segmentation models
    (``lraspp_mobilenet_v3_large``, ``deeplabv3_mobilenet_v3_large``, ``fcn_resnet50``, ...) are
    built without any weights (``weights_backbone=None`` as well: the default would download
    ImageNet weights) and without their auxiliary head (``aux_loss=False``), and wrapped in
    :class:`DenseOutput`; use them with ``task: segmentation``. Single-stage detection models
    (``ssdlite320_mobilenet_v3_large``, ``retinanet_resnet50_fpn_v2``, ``fcos_resnet50_fpn``) are
    built without weights as raw heads (:mod:`toolchain.models.tv_detection`); use them with
    ``task: detection``.

    Raises:
        UnknownNameError: ``name`` is not a torchvision classification or segmentation model;
            lists them.
        UserError: ``image_size`` does not suit a fixed-size model.
    """
    import torchvision.models  # lazy: costs ~1 s and is only needed for this form

    detectors = torchvision.models.list_models(module=torchvision.models.detection)
    if name in detectors:
        from toolchain.models import tv_detection

        return tv_detection.build(name, num_classes)
    dense = torchvision.models.list_models(module=torchvision.models.segmentation)
    if name in dense:
        model = torchvision.models.get_model(
            name, weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False
        )
        return DenseOutput(model)
    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        raise UnknownNameError("torchvision model", name, sorted([*known, *dense, *detectors]))
    kwargs: dict[str, Any] = {}
    for prefix, (keyword, sizes) in _FIXED_SIZE.items():
        if name.startswith(prefix) and image_size is not None:
            kwargs[keyword] = image_size if keyword == "image_size" else (image_size, image_size)
            try:
                return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
            except (AssertionError, ValueError, RuntimeError) as exc:
                raise UserError(
                    f"torchvision:{name} cannot be built for {image_size}x{image_size} images "
                    f"(it needs {sizes}): {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                ) from None
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


def torchvision_task(name: str) -> str:
    """The task a torchvision model predicts for: detection, segmentation or classification."""
    import torchvision.models

    if name in torchvision.models.list_models(module=torchvision.models.detection):
        return "detection"
    if name in torchvision.models.list_models(module=torchvision.models.segmentation):
        return "segmentation"
    return DEFAULT_TASK


def _resolve(target: str) -> Any:
    module_name, _, attr_path = target.partition(":")
    if not module_name or not attr_path:
        raise UserError(f"model {target!r} must look like 'package.module:callable'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise UserError(f"model {target!r}: no module named {exc.name!r} (is it installed?)") from None
        raise UserError(f"model {target!r}: importing {module_name!r} failed: {exc}") from None
    for attr in attr_path.split("."):
        if not hasattr(obj, attr):
            raise UserError(f"model {target!r}: {obj.__name__!r} has no attribute {attr!r}")
        obj = getattr(obj, attr)
    if not callable(obj):
        raise UserError(f"model {target!r}: {attr_path!r} is a {type(obj).__name__}, not callable")
    return obj


def user_net(
    target: str, *, num_classes: int, in_channels: int, image_size: int, task: str = DEFAULT_TASK
) -> nn.Module:
    """Call the factory named ``target = "package.module:callable"`` and check what it returns.

    The factory gets ``num_classes=`` and ``in_channels=`` for each of them that its signature
    names explicitly (so a factory that accepts neither is called with no arguments). Its
    own exceptions propagate with their traceback: they are bugs in the user's code.

    Args:
        target: ``package.module:callable`` (the callable may be dotted, ``mod:Class.create``).
        num_classes, in_channels: what the data needs.
        image_size: used for one dry-run forward pass that checks the output shape.
        task: what the model must predict (:mod:`toolchain.tasks`): the output is checked
            against that task's shape (logits per image, per pixel, ...).

    Returns:
        The bare network (it gets normalised input).

    Raises:
        UserError: the module cannot be imported, the attribute is missing or not callable,
            the result is not an ``nn.Module``, or its output on a
            (1, in_channels, image_size, image_size) batch is not the task's.
    """
    factory = _resolve(target)
    params: Mapping[str, inspect.Parameter]
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # some builtins and C extensions have no signature
        params = {}
    offered = {"num_classes": num_classes, "in_channels": in_channels}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    kwargs = {k: v for k, v in offered.items() if k in params and params[k].kind in kinds}
    net = factory(**kwargs)
    if not isinstance(net, nn.Module):
        raise UserError(f"model {target!r} returned a {type(net).__name__}, not a torch.nn.Module")
    _check_output(net, target, num_classes, in_channels, image_size, task)
    return net


def _check_output(
    net: nn.Module, target: str, num_classes: int, in_channels: int, image_size: int, task: str
) -> None:
    """One forward pass on zeros, so a wrong head or channel count fails here with a clear line."""
    shape = (1, in_channels, image_size, image_size)
    was_training = net.training
    net.eval()  # BN in train mode refuses a batch of one
    try:
        with torch.no_grad():
            out = net(torch.zeros(shape))
    except Exception as exc:  # any failure here means "this model does not fit the data"
        raise UserError(f"model {target!r} fails on a {shape} input: {type(exc).__name__}: {exc}") from exc
    finally:
        net.train(was_training)
    try:
        task_named(task).check_output(out, num_classes, torch.zeros(shape))
    except UserError as exc:
        raise UserError(f"model {target!r}: {exc}") from None
