"""Square attack, L-inf (Andriushchenko et al., ECCV 2020): random search with square updates.

Black-box: it needs only logits, so it runs against any Runner (an ONNX Runtime session, a
TensorRT engine) or a module under ``no_grad``. Written from the paper and the facts of the
official code (max-andr/square-attack, fra31/auto-attack):

* margin loss ``logit_y - max_{j != y} logit_j``; a candidate is kept when it lowers it;
* initialisation with vertical stripes: one random ``±eps`` per column and channel;
* each iteration changes one ``s x s`` window (per channel a random ``±eps``) with
  ``s = round(sqrt(p * H * W))``; ``p`` starts at ``p_init`` and is halved after iterations
  10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 of a 10,000-query budget, the iteration
  index being rescaled for other budgets.

Ours, unlike the official code: every sample draws its own window position (the official code
moves one window for the whole batch), and a window that would leave a sample unchanged has
its signs flipped instead of being re-drawn. Random numbers are drawn for the whole batch on
every iteration, so their sequence never depends on the model's outputs: the same seed gives
the same result on a PyTorch model and on a float32 engine of it, except where a decision
falls within rounding noise of the acceptance threshold (rare: a few of 200 images after
1,000 queries); such a sample then follows its own path, and accuracies still agree closely.

Query counting: the clean prediction is not counted (as in the paper); samples misclassified
at the start are not attacked and count 0 queries; every other sample counts 1 for the stripe
initialisation and 1 per iteration until it is fooled, so each count is at most ``queries``.
"""

from __future__ import annotations

import math

import torch

from toolchain.errors import UserError
from toolchain.robustness.attacks.base import ATTACKS, Attack, AttackResult, Classifier, margin, predict

#: Relative tolerance on margin improvements; see ``Square``.
RTOL = 1e-5
_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_schedule(iteration: int, budget: int, p_init: float = 0.8) -> float:
    """Fraction of pixels changed at ``iteration`` of ``budget`` (the paper's schedule)."""
    scaled = int(iteration / budget * 10_000)
    return p_init / 2 ** sum(scaled > h for h in _HALVINGS)


@ATTACKS.register("square")
class Square(Attack):
    """Untargeted L-inf Square attack with a per-sample query budget.

    Args:
        eps: L-inf radius; norm: ``"linf"`` only.
        queries: per-sample query budget (initialisation included), >= 1.
        p_init: initial fraction of pixels per square; 0.8 as in AutoAttack.
        rtol: a candidate is kept only if it lowers the margin by more than ``rtol`` times
            the sample's largest |logit| (float32 rounding is ~1e-6 of it). 1e-5 measured no
            loss of strength and 2x fewer engine/PyTorch divergences than 0.
        seed: seeds the random search; re-applied at every call.
    """

    name = "square"
    mode = "black-box"
    norms = ("linf",)

    def __init__(
        self,
        *,
        eps: float,
        norm: str = "linf",
        queries: int = 1000,
        p_init: float = 0.8,
        rtol: float = RTOL,
        seed: int = 0,
    ) -> None:
        super().__init__(eps=eps, norm=norm, steps=0, seed=seed)
        if queries < 1:
            raise UserError(f"attack 'square': queries must be >= 1, got {queries}")
        if not 0 < p_init <= 1:
            raise UserError(f"attack 'square': p_init must be in (0, 1], got {p_init}")
        self.queries, self.p_init = int(queries), float(p_init)
        self.rtol = float(rtol)

    def _run(
        self, model: Classifier, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
    ) -> AttackResult:
        n, c, h, w = x.shape
        dev = x.device
        used = torch.zeros(n, dtype=torch.long)
        best_margin = margin(predict(model, x), y)
        x_best = x.clone()

        stripes = self._signs((n, c, 1, w), generator).to(dev)
        active = (best_margin > 0).nonzero().squeeze(1)
        if len(active):
            x_best[active] = (x[active] + self.eps * stripes[active]).clamp(0, 1)
            best_margin[active] = margin(predict(model, x_best[active]), y[active])
            used[active.cpu()] += 1

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
            new_margin = margin(logits, y[active])
            used[active.cpu()] += 1
            # An improvement must exceed the engine's rounding noise, so that float32 engines
            # of one model (PyTorch, ONNX Runtime) take the same decisions.
            noise = self.rtol * logits.abs().amax(1)
            better = new_margin < best_margin[active] - noise
            x_best[active[better]] = candidate[better]
            best_margin[active[better]] = new_margin[better]
        return AttackResult(x_best.detach(), used)

    def _square_size(self, iteration: int, h: int, w: int) -> int:
        p = p_schedule(iteration - 1, self.queries, self.p_init)
        size = round(math.sqrt(p * h * w))
        # Strictly smaller than the image, so the window still has positions to choose from.
        return max(min(size, min(h, w) - 1), 1)

    @staticmethod
    def _signs(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, 2, shape, generator=generator).float() * 2 - 1
