"""Loading a plain ``state_dict`` file into a model, with one-line errors that name the key."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from exporters.errors import resource_error
from toolchain.errors import CheckpointError

_WRAPPERS = ("state_dict", "model")  # common {"state_dict": ...} / {"model": ...} envelopes
_NORMALIZE_PREFIX = "normalize."


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for key in _WRAPPERS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    return {str(k): v for k, v in obj.items()}


def _align_keys(
    state: dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Accept the usual variants: ``module.`` prefixes (DataParallel) and bare-network dicts.

    A checkpoint of the bare network (saved before it was wrapped with ``Normalize``) has keys
    without the ``net.`` prefix; the model's own normalisation buffers fill the gap, as its BN
    ``num_batches_tracked`` counters do for checkpoints written by old PyTorch versions.
    """
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    if not any(k in expected for k in state) and any(f"net.{k}" in expected for k in state):
        state = {f"net.{k}": v for k, v in state.items()}
    # Normalisation buffers and BN step counters carry no learned weights: keep the model's.
    for key, value in expected.items():
        optional = key.startswith(_NORMALIZE_PREFIX) or key.endswith("num_batches_tracked")
        if optional and key not in state:
            state[key] = value
    return state


def load_state_dict_file(model: nn.Module, path: str | Path) -> None:
    """Load weights from ``path`` into ``model`` in place (CPU, ``weights_only=True``).

    Args:
        model: usually a model from ``build_model``.
        path: a ``torch.save``-d state_dict, or a dict holding one under ``"state_dict"`` or
            ``"model"``. Keys may carry a ``module.`` prefix, or omit the ``net.`` prefix
            (a bare-network checkpoint); missing ``normalize.*`` buffers keep the model's.

    Raises:
        CheckpointError: the file is missing or not a weights-only state_dict, or a key is
            missing, unexpected or has the wrong shape (the first one is named).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ... here
        if (resource := resource_error(exc, f"reading checkpoint {path}")) is not None:
            raise resource from None
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        message = f"cannot read checkpoint {path} as a weights-only state_dict: {reason}"
        raise CheckpointError(message) from None
    expected = model.state_dict()
    state = _align_keys(_unwrap(raw, path), expected)
    for key, value in expected.items():
        if key not in state:
            raise CheckpointError(f"checkpoint {path} lacks {key!r} (shape {tuple(value.shape)})")
        if state[key].shape != value.shape:
            raise CheckpointError(
                f"checkpoint {path}: {key!r} has shape {tuple(state[key].shape)}, "
                f"the model expects {tuple(value.shape)}"
            )
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise CheckpointError(
            f"checkpoint {path} has {len(unexpected)} key(s) the model lacks, first {unexpected[0]!r}"
        )
    model.load_state_dict(state, strict=True)
