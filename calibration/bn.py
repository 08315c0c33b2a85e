"""Re-estimate BatchNorm running statistics, e.g. after channels were pruned.

Pruning removes channels that fed every later layer, so the running means and variances the
BatchNorm layers learned no longer describe their inputs; a few forward passes over training
data fix them without touching a single weight.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

_BatchNorm = nn.modules.batchnorm._BatchNorm


def _images(batch: Any) -> torch.Tensor:
    """Accept ``(images, labels, ...)`` batches as well as bare image tensors."""
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch


def recalibrate_bn(
    model: nn.Module,
    loader: Iterable[Any],
    batches: int = 20,
    progress: bool = False,
) -> nn.Module:
    """Reset every BatchNorm's running statistics and re-estimate them from ``loader``.

    During the passes each BatchNorm uses ``momentum=None`` (a cumulative average, so every
    batch counts equally instead of the last ones dominating) and is in train mode; every
    other module is in eval mode, so dropout is off and the statistics match what inference
    sees. Only buffers change; momentum and every module's train/eval mode are restored.

    Args:
        model: the model, modified in place.
        loader: yields image batches or ``(images, labels)`` tuples, in the model's input space.
        batches: how many batches to average over (fewer if the loader runs out).
        progress: show a tqdm bar.

    Returns:
        ``model``, for chaining.

    Raises:
        ValueError: ``batches < 1``, or the loader yielded nothing. On any error the old
            statistics are put back rather than left reset.
    """
    if batches < 1:
        raise ValueError(f"batches must be >= 1, got {batches}")
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not norms:
        logger.info("no BatchNorm layer with running statistics: nothing to recalibrate")
        return model
    modes = [(m, m.training) for m in model.modules()]
    momenta = [m.momentum for m in norms]
    saved = [{k: v.clone() for k, v in m.named_buffers(recurse=False) if v is not None} for m in norms]
    device = next(iter(norms[0].buffers())).device
    used = 0
    try:
        model.eval()
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None
            norm.train()
        with torch.no_grad():
            for batch in tqdm(
                loader, total=batches, desc="BN recalibration", disable=None if progress else True
            ):
                if used >= batches:
                    break
                model(_images(batch).to(device))
                used += 1
    except BaseException:
        _restore(norms, saved)  # half-estimated statistics are worse than the old ones
        raise
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        for module, training in modes:
            module.training = training
        if used == 0:
            _restore(norms, saved)
    if used == 0:
        raise ValueError("the BN recalibration loader yielded no batches")
    logger.info("recalibrated %d BatchNorm layer(s) on %d batch(es)", len(norms), used)
    return model


def _restore(norms: list[_BatchNorm], saved: list[dict[str, torch.Tensor]]) -> None:
    with torch.no_grad():
        for norm, buffers in zip(norms, saved):
            for name, value in buffers.items():
                getattr(norm, name).copy_(value)
