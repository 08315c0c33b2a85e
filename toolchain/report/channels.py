"""Output channels per layer of a run's dense and pruned models (for the report's plot)."""

from __future__ import annotations

from pathlib import Path

import torch

#: report model name → the stage whose saved model it is.
MODEL_STAGES = {"dense": "train", "pruned": "finetune"}


def layer_channels(root: Path, example_inputs: torch.Tensor) -> dict[str, dict[str, int]]:
    """Rebuild the saved dense and pruned models of a run directory and count their channels.

    Args:
        root: the run directory (``train/model.pt``, ``finetune/model.pt``).
        example_inputs: an input batch to replay the pruning history on.

    Returns:
        ``{"dense": {layer: out_channels}, "pruned": {...}}`` for the models that exist.

    Raises:
        CheckpointError: a saved model cannot be loaded.
    """
    from toolchain.models import build_from_spec
    from toolchain.pruning import load_pruned
    from toolchain.pruning.graph import out_channels

    channels = {}
    for name, stage in MODEL_STAGES.items():
        path = root / stage / "model.pt"
        if path.is_file():
            model, _ = load_pruned(path, build_from_spec, example_inputs)
            channels[name] = out_channels(model)
    return channels
