"""Models: a small CIFAR-style zoo, torchvision models and user factories, all wrapped so
they take [0, 1] pixels (normalisation lives inside the model and inside every export).

``arch`` is one of:

* a zoo name: ``convnet``, ``resnet20``, ``resnet18``, ``vgg11_bn``, ``mobilenetv2``
  (any input channels, 28x28 or 32x32 and up, ``width`` scales channel counts), the
  segmentation encoder-decoder ``segnet`` or the detector ``detnet`` (:func:`zoo_task` says
  which task a zoo name is for);
* ``torchvision:<name>``: ``torchvision.models.get_model(name, weights=None, ...)``;
* ``package.module:callable``: your own factory (the only code a recipe can import).

Every model carries ``.spec``; ``build_from_spec(model.spec)`` rebuilds the architecture,
which is how pruned models are saved without pickling code.
"""

from __future__ import annotations

# Importing the zoo modules registers them in MODELS.
from toolchain.models import convnet, detnet, mobilenet, resnet, segnet, vgg
from toolchain.models.base import MODELS, Normalize, NormalizedClassifier, zoo_task
from toolchain.models.checkpoint import load_state_dict_file
from toolchain.models.factory import (
    SPEC_KEYS,
    arch_task,
    build_from_spec,
    build_model,
    model_spec,
    trusted_builder,
)

__all__ = [
    "MODELS",
    "SPEC_KEYS",
    "Normalize",
    "NormalizedClassifier",
    "arch_task",
    "build_from_spec",
    "build_model",
    "load_state_dict_file",
    "model_spec",
    "trusted_builder",
    "zoo_task",
]
_ZOO = (convnet, detnet, mobilenet, resnet, segnet, vgg)
