"""A model's outputs: one tensor (classification, segmentation logits) or a tuple of tensors
(a detector's raw heads), every one with the batch as its first axis. Runners, batching and
parity treat both alike through these helpers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Union

import torch

__all__ = ["Outputs", "as_tuple", "concat", "like", "map_outputs", "take"]

#: What a model or runner returns for a batch.
Outputs = Union[torch.Tensor, tuple[torch.Tensor, ...]]  # noqa: UP007  # a runtime alias


def as_tuple(out: Outputs) -> tuple[torch.Tensor, ...]:
    """The outputs as a tuple (one element for a single tensor)."""
    return tuple(out) if isinstance(out, tuple | list) else (out,)


def like(template: Outputs, tensors: Sequence[torch.Tensor]) -> Outputs:
    """``tensors`` in the form of ``template``: a tensor for a single output, else a tuple."""
    return tuple(tensors) if isinstance(template, tuple | list) else tensors[0]


def map_outputs(fn: Callable[[torch.Tensor], torch.Tensor], out: Outputs) -> Outputs:
    """``fn`` applied to every tensor of ``out``, keeping its form."""
    return like(out, [fn(t) for t in as_tuple(out)])


def take(out: Outputs, start: int, stop: int) -> Outputs:
    """Rows ``start:stop`` (images) of every output."""
    return map_outputs(lambda t: t[start:stop], out)


def concat(parts: Sequence[Outputs]) -> Outputs:
    """Batches of outputs joined along the batch axis."""
    columns = zip(*(as_tuple(p) for p in parts))
    return like(parts[0], [torch.cat(list(column)) for column in columns])
