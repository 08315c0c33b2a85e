"""Save and load pruned models without pickling code.

A pruned model is stored as: the spec the dense model is built from, the pruning history, and
the state_dict with its metadata. Loading builds the dense model, replays the history through a
fresh dependency graph (which shrinks the layers), then loads the weights; ``torch.load(
weights_only=True)`` means a checkpoint can carry tensors and plain data only, never code.

The state_dict's metadata (``state_dict._metadata``: each module's ``version``) is kept as a
plain dict beside it: modules such as torchvision's MNASNet refuse weights without it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from exporters.errors import resource_error
from toolchain.errors import CheckpointError, UserError
from toolchain.pruning.graph import build_graph, frozen_kept, plain_history, resync
from toolchain.pruning.lowrank import apply_structure

FORMAT = "robustprune.pruned/1"


def _check_json(what: str, value: Any) -> None:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise UserError(
            f"{what} must be JSON-serialisable (str, int, float, bool, list, dict): {exc}"
        ) from None


def save_pruned(
    path: str | os.PathLike[str],
    *,
    spec: dict[str, Any],
    history: list[Any],
    state_dict: dict[str, torch.Tensor],
    extra: dict[str, Any] | None = None,
    structure: list[dict[str, Any]] | None = None,
) -> None:
    """Write a pruned model atomically (a temporary file renamed into place).

    Args:
        path: destination file (parent folders are created).
        spec: what ``build`` needs to rebuild the dense model, e.g. ``{"arch": "resnet20"}``.
        history: ``PruneResult.history``.
        state_dict: the pruned model's ``state_dict()``.
        extra: any JSON-serialisable metadata (MACs, criterion, ...).
        structure: low-rank factorisation records (:mod:`toolchain.pruning.lowrank`), applied
            after the pruning history when loading.

    Raises:
        UserError: ``spec``, ``history`` or ``extra`` is not JSON-serialisable.
    """
    history = plain_history(history)
    _check_json("spec", spec)
    _check_json("extra", extra)
    _check_json("structure", structure)
    metadata = _plain_metadata(getattr(state_dict, "_metadata", None))
    payload = {
        "format": FORMAT,
        "spec": spec,
        "history": history,
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
        "state_dict_metadata": metadata,
        "extra": extra or {},
        "structure": list(structure or []),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _plain_metadata(metadata: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """``state_dict._metadata`` as JSON types (``{module prefix: {"version": 2}}``); entries
    that are not plain data are dropped rather than pickled."""
    plain: dict[str, dict[str, Any]] = {}
    for prefix, entry in (metadata or {}).items():
        values = {k: v for k, v in dict(entry).items() if isinstance(v, (bool, int, float, str))}
        if values:
            plain[str(prefix)] = values
    return plain


def load_pruned(
    path: str | os.PathLike[str],
    build: Callable[[dict[str, Any]], nn.Module],
    example_inputs: Any,
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model saved by :func:`save_pruned`.

    Args:
        path: the checkpoint.
        build: returns the *dense* model for a spec (e.g. the model zoo's builder).
        example_inputs: inputs to trace the dependency graph (any batch size).

    Returns:
        ``(model, meta)``: the pruned model in eval mode, and ``{"spec", "extra", "history",
        "structure"}``.

    Raises:
        CheckpointError: missing or unreadable file, wrong format, a history that does not fit
            the built architecture, or weights that do not match it.
    """
    return rebuild_pruned(read_pruned(path), build, example_inputs, source=repr(str(path)))


def read_pruned(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The payload :func:`save_pruned` wrote (plain values and tensors, read weights-only).

    Raises:
        CheckpointError: missing or unreadable file, or not a pruned model.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"pruned checkpoint {str(path)!r} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise resource_error(exc, f"reading {path}") or CheckpointError(
            f"cannot read pruned checkpoint {str(path)!r}: {exc}"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a pruned model saved by save_pruned ({FORMAT})")
    return payload


def rebuild_pruned(
    payload: dict[str, Any],
    build: Callable[[dict[str, Any]], nn.Module],
    example_inputs: Any,
    *,
    source: str = "the pruned model",
) -> tuple[nn.Module, dict[str, Any]]:
    """Build the dense model from the payload's spec, replay its pruning history and structure,
    and load its weights (what every rank of a distributed run does with rank 0's payload).

    Raises:
        CheckpointError: the history, structure or weights do not fit the built architecture.
    """
    model = build(payload["spec"])
    model.eval()
    try:
        with frozen_kept(model):
            build_graph(model, example_inputs).load_pruning_history(payload["history"])
    except (AttributeError, IndexError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"the pruning history in {source} does not fit the model built from its spec "
            f"{payload['spec']}: {exc}"
        ) from None
    resync(model)
    structure = payload.get("structure", [])
    try:
        apply_structure(model, structure)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(
            f"the factorisation recorded in {source} does not fit the model: {exc}"
        ) from None
    state = OrderedDict(payload["state_dict"])
    state._metadata = OrderedDict(payload.get("state_dict_metadata") or {})  # type: ignore[attr-defined]
    try:
        model.load_state_dict(state)
    except (RuntimeError, ValueError) as exc:
        raise CheckpointError(f"weights in {source} do not match the pruned architecture: {exc}") from None
    meta = {
        "spec": payload["spec"],
        "extra": payload.get("extra", {}),
        "history": payload["history"],
        "structure": structure,
    }
    return model, meta
