"""Runner for a PyTorch module: the reference every exported runtime is compared against."""

from __future__ import annotations

import copy

import torch
from torch import nn

from exporters.base import InputSpec, Runner
from exporters.errors import RuntimeUnavailableError, UserError
from exporters.runtime_spec import RuntimeSpec, register

__all__ = ["TorchRunner"]

_PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16}


class TorchRunner(Runner):
    """Runs an ``nn.Module`` in eval mode under ``torch.no_grad``.

    The caller's module is used as is when it already has the requested device and dtype (so
    the runner sees later weight updates); otherwise a converted copy is made, so the caller's
    module is never moved or cast behind its back. Each call runs in eval mode and restores
    the module's training flags afterwards.
    """

    runtime = "torch"

    def __init__(
        self,
        model: nn.Module,
        input_spec: InputSpec,
        device: str = "cpu",
        precision: str = "fp32",
    ) -> None:
        """Wrap ``model``.

        Args:
            model: maps float32 ``(N, C, H, W)`` pixels in [0, 1] to ``(N, K)`` logits.
            input_spec: the accepted input shape.
            device: ``"cpu"`` or a CUDA device (``"cuda"``, ``"cuda:1"``).
            precision: ``"fp32"``, or ``"fp16"`` (CUDA only: CPU half convolutions are slow
                and not what any deployment runs).

        Raises:
            UserError: unknown precision, or fp16 asked for on the CPU.
            RuntimeUnavailableError: a CUDA device was asked for but CUDA is not available.
        """
        if not isinstance(model, nn.Module):
            raise UserError(f"TorchRunner needs a torch.nn.Module, got {type(model).__name__}")
        if precision not in _PRECISIONS:
            raise UserError(f"TorchRunner precision must be one of {sorted(_PRECISIONS)}, got {precision!r}")
        torch_device = torch.device(device)
        if torch_device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeUnavailableError(f"device {device!r} requested but CUDA is not available; use 'cpu'")
        if precision == "fp16" and torch_device.type != "cuda":
            raise UserError("TorchRunner runs fp16 on CUDA only; use precision='fp32' on the CPU")
        super().__init__(input_spec=input_spec, precision=precision, device=str(torch_device))
        self._dtype = _PRECISIONS[precision]
        self.model = _on(model, torch_device, self._dtype)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        modes = [(module, module.training) for module in self.model.modules()]
        self.model.eval()
        try:
            return self.model(x.to(self.device, self._dtype))
        finally:
            for module, training in modes:
                module.training = training


def _on(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    tensors = [*model.parameters(), *model.buffers()]
    floats = [t for t in tensors if t.is_floating_point()]
    already = all(
        t.device == device or (t.device.type == device.type and device.index is None) for t in tensors
    )
    if already and all(t.dtype == dtype for t in floats):
        return model
    return copy.deepcopy(model).to(device=device, dtype=dtype)


register(RuntimeSpec("torch", TorchRunner, "model", description="the PyTorch model itself (the reference)"))
