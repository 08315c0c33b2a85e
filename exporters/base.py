"""The Runner contract: the one way validation and benchmarks touch a model.

A runner maps a float32 NCHW batch of pixels in [0, 1] to float32 logits. Normalisation lives
inside the model (or the exported file), never in the caller. Subclasses implement ``_run``
only; ``__call__`` validates the batch first, so every runtime rejects bad input the same way.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from exporters.errors import InputSpecError
from exporters.outputs import Outputs, map_outputs


@dataclass(frozen=True)
class InputSpec:
    """What a runner accepts: ``channels x height x width`` with a free (or fixed) batch size."""

    channels: int
    height: int
    width: int
    batch: int | None = None  # None: any batch size (dynamic batch dimension)

    def shape(self, batch: int = 1) -> tuple[int, int, int, int]:
        return (batch, self.channels, self.height, self.width)

    def check(self, x: torch.Tensor, runner_name: str) -> None:
        """Raise :class:`InputSpecError` unless ``x`` is a float32 batch this spec accepts."""
        if not isinstance(x, torch.Tensor):
            raise InputSpecError(
                f"{runner_name}: expected a torch.Tensor batch, got {type(x).__name__}; "
                "convert with torch.from_numpy(array).float()"
            )
        if x.dtype != torch.float32:
            raise InputSpecError(
                f"{runner_name}: expected float32 pixels in [0, 1], got {x.dtype}; "
                "convert with x.float() / 255 for uint8 images"
            )
        expected = (self.channels, self.height, self.width)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise InputSpecError(
                f"{runner_name}: expected shape (N, {', '.join(map(str, expected))}), "
                f"got {tuple(x.shape)}; resize the images or rebuild the engine for this size"
            )
        if self.batch is not None and x.shape[0] != self.batch:
            raise InputSpecError(
                f"{runner_name}: this engine has a fixed batch of {self.batch}, got {x.shape[0]}; "
                "export with a dynamic batch dimension or feed batches of that size"
            )


class Runner(ABC):
    """Wraps one model in one runtime at one precision.

    Attributes:
        name: a human-readable id, e.g. ``"onnxruntime/fp32"``.
        runtime: ``"torch"``, ``"onnxruntime"`` or ``"tensorrt"``.
        precision: ``"fp32"``, ``"fp16"`` or ``"int8"``.
        device: ``"cpu"`` or ``"cuda"`` (``"cuda:0"`` ...).
        input_spec: the accepted input shape.
    """

    runtime: str = "?"

    def __init__(self, *, input_spec: InputSpec, precision: str = "fp32", device: str = "cpu"):
        self.input_spec = input_spec
        self.precision = precision
        self.device = device

    @property
    def name(self) -> str:
        return f"{self.runtime}/{self.precision}/{self.device}"

    def __call__(self, x: torch.Tensor) -> Outputs:
        """The model's outputs for a batch of pixels.

        Args:
            x: float32 tensor of shape ``(N, C, H, W)`` with values in [0, 1], on any device.

        Returns:
            float32 outputs on the CPU, detached: logits ``(N, num_classes)`` (per pixel for
            segmentation), or a tuple of tensors for a model with several outputs (a detector's
            raw heads), each with the batch first.

        Raises:
            InputSpecError: wrong type, dtype or shape.
        """
        self.input_spec.check(x, self.name)
        with torch.no_grad():
            out = self._run(x.detach())
        return map_outputs(lambda t: t.detach().to("cpu", torch.float32), out)

    @abstractmethod
    def _run(self, x: torch.Tensor) -> Outputs:
        """Run the validated batch; return its outputs (any device, any float dtype)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, input={self.input_spec.shape(0)[1:]})"
