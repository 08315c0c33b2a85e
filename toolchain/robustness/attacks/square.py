"""Square attack, L-inf (Andriushchenko et al., ECCV 2020): random search with square updates.

Black-box: it needs only logits, so it runs against any Runner (an ONNX Runtime session, a
TensorRT engine) or a module under ``no_grad``. Written from the paper and the facts of the
official code (max-andr/square-attack, fra31/auto-attack):

* margin loss ``logit_y - max_{j != y} logit_j``; a candidate is kept when it lowers the
  margin at all, or when it misclassifies the image (margin <= 0);
* initialisation with vertical stripes: one random ``±eps`` per column and channel;
* each iteration changes one ``s x s`` window (per channel a random ``±eps``) with
  ``s = round(sqrt(p * H * W))``; ``p`` starts at ``p_init`` and is halved after iterations
  10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 of a 10,000-query budget, the iteration
  index being rescaled for other budgets (``rescale_schedule``; AutoAttack's standard run
  keeps the 10,000-query schedule for its 5,000 queries, ``rescale_schedule=False``).

Ours, unlike the official code: every sample draws its own window position (the official code
moves one window for the whole batch), windows may touch the last row and column (the
official code's ``random_int(0, h - s)`` never does), and a window that would leave a sample
unchanged has its signs flipped instead of being re-drawn. Random numbers are drawn for the
whole batch on every iteration, so their sequence never depends on the model's outputs: the
same seed gives the same result on a PyTorch model and on a float32 engine of it, except where
two candidates' margins differ by float32 rounding (rare: a few of 200 images after 1,000
queries); such a sample then follows its own path, and accuracies still agree closely.

Query counting: the clean prediction is not counted (as in the paper); samples misclassified
at the start are not attacked and count 0 queries; every other sample counts 1 for the stripe
initialisation and 1 per iteration until it is fooled, so each count is at most ``queries``
(the official code allows ``queries`` iterations after the initialisation).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from toolchain.errors import UserError
from toolchain.robustness.attacks.base import ATTACKS, Attack, AttackResult, Classifier, predict
from toolchain.tasks import take_labels

_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_schedule(iteration: int, budget: int, p_init: float = 0.8, rescale: bool = True) -> float:
    """Fraction of pixels changed at ``iteration`` of ``budget`` (the paper's schedule).

    With ``rescale`` the 10,000-query schedule is stretched to ``budget``; without, it is used
    as it is (AutoAttack's standard 5,000-query run).
    """
    scaled = int(iteration / budget * 10_000) if rescale else iteration
    return p_init / 2 ** sum(scaled > h for h in _HALVINGS)


@ATTACKS.register("square")
class Square(Attack):
    """Untargeted L-inf Square attack with a per-sample query budget.

    Args:
        eps: L-inf radius; norm: ``"linf"`` only.
        queries: per-sample query budget (initialisation included), >= 1.
        p_init: initial fraction of pixels per square; 0.8 as in AutoAttack.
        rescale_schedule: stretch the 10,000-query ``p`` schedule to ``queries`` (default);
            ``False`` as in AutoAttack's standard run.
        seed: seeds the random search; re-applied at every call.
    """

    name = "square"
    mode = "black-box"
    norms = ("linf",)
    tasks = frozenset({"classification", "detection"})
    limited_because = "Square is a black-box search for one image-level misclassification"

    def __init__(
        self,
        *,
        eps: float,
        norm: str = "linf",
        queries: int = 1000,
        p_init: float = 0.8,
        rescale_schedule: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(eps=eps, norm=norm, steps=0, seed=seed)
        if queries < 1:
            raise UserError(f"attack 'square': queries must be >= 1, got {queries}")
        if not 0 < p_init <= 1:
            raise UserError(f"attack 'square': p_init must be in (0, 1], got {p_init}")
        self.queries, self.p_init = int(queries), float(p_init)
        self.rescale_schedule = bool(rescale_schedule)

    def _run(self, model: Classifier, x: torch.Tensor, y: Any, generator: torch.Generator) -> AttackResult:
        n, c, h, w = x.shape
        dev = x.device
        # Every image here is classified correctly (``Attack.__call__`` checked): start from
        # the vertical stripes, 1 query each.
        stripes = self._signs((n, c, 1, w), generator).to(dev)
        x_best = (x + self.eps * stripes).clamp(0, 1)
        objective = self.objective(model)
        best_margin = objective.margin(predict(model, x_best), y)
        used = torch.ones(n, dtype=torch.long)

        rows, cols = torch.arange(h, device=dev), torch.arange(w, device=dev)
        for it in range(1, self.queries):
            # Drawn for every sample, active or not, so the stream ignores the outputs.
            size = self._square_size(it, h, w)
            top = (torch.rand(n, generator=generator) * (h - size + 1)).long().to(dev)
            left = (torch.rand(n, generator=generator) * (w - size + 1)).long().to(dev)
            signs = self._signs((n, c, 1, 1), generator).to(dev)
            active = (best_margin > 0).nonzero().squeeze(1)
            if len(active) == 0:
                break  # everything is fooled; later draws could change nothing
            xa, xb, t, lft, sg = x[active], x_best[active], top[active], left[active], signs[active]
            in_rows = (rows >= t[:, None]) & (rows < t[:, None] + size)
            in_cols = (cols >= lft[:, None]) & (cols < lft[:, None] + size)
            window = (in_rows[:, :, None] & in_cols[:, None, :]).unsqueeze(1)
            candidate = torch.where(window, (xa + self.eps * sg).clamp(0, 1), xb)
            # A window equal to the current point wastes a query; its opposite never is.
            same = (candidate == xb).flatten(1).all(1).view(-1, 1, 1, 1)
            flipped = torch.where(window, (xa - self.eps * sg).clamp(0, 1), xb)
            candidate = torch.where(same, flipped, candidate)

            logits = predict(model, candidate)
            new_margin = objective.margin(logits, take_labels(y, active))
            used[active.cpu()] += 1
            # Any decrease is kept, as in the reference; a candidate that misclassifies is always
            # one, since only samples with a positive margin are still active.
            better = new_margin < best_margin[active]
            x_best[active[better]] = candidate[better]
            best_margin[active[better]] = new_margin[better]
        return AttackResult(x_best.detach(), used)

    def _square_size(self, iteration: int, h: int, w: int) -> int:
        p = p_schedule(iteration - 1, self.queries, self.p_init, self.rescale_schedule)
        size = round(math.sqrt(p * h * w))
        # Strictly smaller than the image, so the window still has positions to choose from.
        return max(min(size, min(h, w) - 1), 1)

    @staticmethod
    def _signs(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, 2, shape, generator=generator).float() * 2 - 1
