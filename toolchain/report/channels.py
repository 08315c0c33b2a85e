"""Output channels per layer of a run's dense and pruned models (for the report's plot)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: report model name → the stage whose saved model it is.
MODEL_STAGES = {"dense": "train", "pruned": "finetune"}


def layer_channels(
    root: Path, example_inputs: torch.Tensor, build: Callable[[Mapping[str, Any]], nn.Module]
) -> dict[str, dict[str, int]]:
    """Rebuild the saved dense and pruned models of a run directory and count their channels.

    Args:
        root: the run directory (``train/model.pt``, ``finetune/model.pt``).
        example_inputs: an input batch to replay the pruning history on.
        build: rebuilds a dense model from its spec (only factories the user trusts).

    Returns:
        ``{"dense": {layer: out_channels}, "pruned": {...}}`` for the models that exist.

    Raises:
        CheckpointError: a saved model cannot be loaded.
    """
    from toolchain.pruning import load_pruned
    from toolchain.pruning.graph import out_channels

    channels = {}
    for name, stage in MODEL_STAGES.items():
        path = root / stage / "model.pt"
        if path.is_file():
            model, _ = load_pruned(path, build, example_inputs)
            channels[name] = out_channels(model)
    return channels
