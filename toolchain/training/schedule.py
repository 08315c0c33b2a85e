"""Learning-rate (and momentum) schedules as a function of the optimisation step.

The learning rate is a multiplier of each parameter group's own base learning rate; the
one-cycle schedule also sets SGD's momentum, as torch's ``OneCycleLR`` does by default.
"""

from __future__ import annotations

import math

from toolchain.recipe_train import TrainConfig

ONECYCLE_WARMUP = 0.3  # fraction of steps rising to the peak (torch's OneCycleLR default)
ONECYCLE_START = 1 / 25  # initial lr / peak lr (torch's div_factor 25)
ONECYCLE_END = ONECYCLE_START / 1e4  # final lr / peak lr (torch's final_div_factor 1e4)
# torch's OneCycleLR cycles momentum inversely to the lr between these (its base_momentum and
# max_momentum defaults): high momentum while the lr is low, low momentum at the peak lr.
ONECYCLE_MOMENTUM = (0.85, 0.95)


def _cosine(start: float, end: float, progress: float) -> float:
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))


def _onecycle_phase(step: int, total: int) -> tuple[bool, float]:
    """``(rising, progress in [0, 1])`` at ``step``, with torch's phase boundaries: the peak is
    at step ``0.3 * total - 1`` and the last step ``total - 1`` ends the fall."""
    peak = ONECYCLE_WARMUP * total - 1
    if step <= peak:
        return True, step / peak if peak > 0 else 1.0
    return False, min((step - peak) / max(total - 1 - peak, 1e-12), 1.0)


def lr_factor(cfg: TrainConfig, step: int, total: int, steps_per_epoch: int) -> float:
    """The multiplier of the base learning rate at ``step`` (0-based) of ``total``.

    * ``constant`` / ``cosine`` (annealed to 0), after ``lr_warmup_epochs`` of linear warm-up
      from 0;
    * ``onecycle`` (Smith & Topin 2019, step for step as torch's ``OneCycleLR`` with cosine
      annealing): from 1/25 of the peak up to the peak over the first 30% of steps, then down
      to 1/250000.
    """
    if total <= 1:
        return 1.0
    if cfg.schedule == "onecycle":
        rising, progress = _onecycle_phase(step, total)
        if rising:
            return _cosine(ONECYCLE_START, 1.0, progress)
        return _cosine(1.0, ONECYCLE_END, progress)
    warmup = round(cfg.lr_warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if cfg.schedule == "constant":
        return 1.0
    return _cosine(1.0, 0.0, (step - warmup) / max(total - warmup, 1))


def momentum_at(cfg: TrainConfig, step: int, total: int) -> float:
    """SGD's momentum at ``step``: ``cfg.momentum``, except under ``onecycle`` with
    ``cycle_momentum``, where it falls from 0.95 to 0.85 while the lr rises and climbs back
    while it falls (torch's ``OneCycleLR`` default, which plain training scripts get)."""
    if cfg.schedule != "onecycle" or not cfg.cycle_momentum or total <= 1:
        return cfg.momentum
    low, high = ONECYCLE_MOMENTUM
    rising, progress = _onecycle_phase(step, total)
    return _cosine(high, low, progress) if rising else _cosine(low, high, progress)
