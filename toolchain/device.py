"""Which torch device a run uses: ``auto`` (CUDA when available), ``cpu`` or ``cuda[:N]``."""

from __future__ import annotations

import torch

from toolchain.errors import UserError


def resolve_device(spec: str) -> str:
    """The concrete device for a recipe's ``device`` setting.

    Raises:
        UserError: CUDA was asked for but is not available, or the index does not exist.
    """
    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        raise UserError(
            f"device {spec!r} asked for, but CUDA is not available here; set device: cpu (or auto)"
        )
    index = int(spec.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise UserError(
            f"device {spec!r} asked for, but this machine has {torch.cuda.device_count()} CUDA device(s); "
            "use cuda:0"
        )
    return spec
