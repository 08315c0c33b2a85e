"""Learning-rate schedules as a multiplier of each parameter group's own base learning rate."""

from __future__ import annotations

import math

from toolchain.recipe_train import TrainConfig

ONECYCLE_WARMUP = 0.3  # fraction of steps rising to the peak (torch's OneCycleLR default)
ONECYCLE_START = 1 / 25  # initial lr / peak lr (torch's div_factor 25)
ONECYCLE_END = ONECYCLE_START / 1e4  # final lr / peak lr (torch's final_div_factor 1e4)


def _cosine(start: float, end: float, progress: float) -> float:
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_factor(cfg: TrainConfig, step: int, total: int, steps_per_epoch: int) -> float:
    """The multiplier of the base learning rate at ``step`` (0-based) of ``total``.

    * ``constant`` / ``cosine`` (annealed to 0), after ``lr_warmup_epochs`` of linear warm-up
      from 0;
    * ``onecycle`` (Smith & Topin 2019, as torch's ``OneCycleLR`` with cosine annealing): from
      1/25 of the peak up to the peak over the first 30% of steps, then down to 1/250000.
    """
    if total <= 1:
        return 1.0
    if cfg.schedule == "onecycle":
        rise = max(1, round(ONECYCLE_WARMUP * total))
        if step < rise:
            return _cosine(ONECYCLE_START, 1.0, step / rise)
        return _cosine(1.0, ONECYCLE_END, (step - rise) / max(total - rise, 1))
    warmup = round(cfg.lr_warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if cfg.schedule == "constant":
        return 1.0
    return _cosine(1.0, 0.0, (step - warmup) / max(total - warmup, 1))
