"""Robustness-aware INT8 calibration data: clean, corrupted and adversarial images, mixed.

Activation ranges calibrated on clean images only can clip the larger activations that
corrupted or adversarial inputs produce, so INT8 may lose more robustness than clean accuracy.
A mixed calibration set lets the ranges see such inputs; the pipeline calibrates both ways
and reports both, so the user sees which keeps robustness at INT8.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from exporters.errors import UserError

__all__ = ["CalibrationMix", "Corrupt", "Craft", "build_calibration_set", "take_images"]


class Corrupt(Protocol):
    """``corrupt(name, x, severity, seed=...)``: ``x`` under a named corruption (the caller's
    corruption suite, e.g. :func:`toolchain.robustness.corruptions.corrupt`)."""

    def __call__(self, name: str, x: torch.Tensor, severity: int, *, seed: int) -> torch.Tensor: ...


#: ``craft(x, y) -> x_adv``: adversarial versions of every image of a batch, crafted by the
#: caller on its PyTorch model (this library knows no attack and no model).
Craft = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationMix:
    """Shares of each kind of image in the calibration set (normalised to sum to 1).

    Attributes:
        clean: share of unmodified images.
        corrupted: share of images under a corruption (cycling through ``corruptions`` and
            ``severities``).
        adversarial: share of PGD examples crafted on the PyTorch model.
    """

    clean: float = 1.0
    corrupted: float = 0.0
    adversarial: float = 0.0

    def counts(self, total: int) -> dict[str, int]:
        """Images of each kind out of ``total`` (largest remainders, so they add up exactly).

        Raises:
            UserError: a negative share, or all shares zero.
        """
        shares = {"clean": self.clean, "corrupted": self.corrupted, "adversarial": self.adversarial}
        if any(v < 0 for v in shares.values()) or sum(shares.values()) <= 0:
            raise UserError(f"calibration mix shares must be >= 0 and not all zero, got {shares}")
        norm = sum(shares.values())
        exact = {k: total * v / norm for k, v in shares.items()}
        counts = {k: int(v) for k, v in exact.items()}
        for k in sorted(exact, key=lambda k: exact[k] - counts[k], reverse=True)[
            : total - sum(counts.values())
        ]:
            counts[k] += 1
        return counts

    @property
    def is_clean(self) -> bool:
        return self.corrupted == 0 and self.adversarial == 0


def build_calibration_set(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    samples: int,
    mix: CalibrationMix,
    *,
    corruptions: Sequence[str] = (),
    severities: Sequence[int] = (3,),
    corrupt: Corrupt | None = None,
    craft: Craft | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, dict[str, int]]:
    """Draw ``samples`` images from ``batches`` and perturb the mix's shares of them.

    The first images of the stream become the calibration set (the loader decides their
    order); each is used once, as clean, corrupted or adversarial, in that order.

    Args:
        batches: ``(x, y)`` batches of float32 pixels in [0, 1] (training data, ideally).
        samples: images in the calibration set.
        mix: the shares of clean, corrupted and adversarial images.
        corruptions: corruption names to cycle through (needed if ``mix.corrupted > 0``).
        severities: severities to cycle through.
        corrupt: applies a named corruption (needed if ``mix.corrupted > 0``).
        craft: makes the adversarial share (needed if ``mix.adversarial > 0``); called on chunks
            of at most 128 images, in order, every image perturbed (misclassified ones too: the
            calibration set wants the activation ranges attacks produce, not a verdict).
        seed: seeds the corruptions (the caller seeds ``craft``).

    Returns:
        ``(images, counts)``: a float32 CPU tensor ``(samples, C, H, W)`` and the number of
        images of each kind.

    Raises:
        UserError: fewer images than ``samples``, or a share that needs a missing ingredient.
    """
    if samples < 1:
        raise UserError(f"calibration samples must be >= 1, got {samples}")
    counts = mix.counts(samples)
    if counts["corrupted"] and (not corruptions or corrupt is None):
        raise UserError("the calibration mix has corrupted images but no corruptions are named")
    if counts["adversarial"] and craft is None:
        raise UserError("the calibration mix has adversarial images but no PyTorch model to craft them on")
    xs, ys = take_images(batches, samples)
    kinds = ["clean"] * counts["clean"] + ["corrupted"] * counts["corrupted"]
    kinds += ["adversarial"] * counts["adversarial"]
    out = xs.clone()
    corrupted = [i for i, k in enumerate(kinds) if k == "corrupted"]
    for j, index in enumerate(corrupted):
        assert corrupt is not None  # checked above
        name = corruptions[j % len(corruptions)]
        severity = int(severities[(j // len(corruptions)) % len(severities)])
        out[index] = corrupt(name, xs[index], severity, seed=seed * 1_000_003 + index)
    adversarial = torch.tensor([i for i, k in enumerate(kinds) if k == "adversarial"], dtype=torch.long)
    for chunk in (
        adversarial.split(128) if len(adversarial) else ()
    ):  # split() of nothing gives one empty chunk
        assert craft is not None  # checked above
        out[chunk] = craft(xs[chunk], _pick(ys, chunk)).detach().cpu()
    log.info("calibration set: %s", counts)
    return out.contiguous(), counts


def take_images(
    batches: Iterable[tuple[torch.Tensor, Any]], samples: int, *, minimum: int | None = None
) -> tuple[torch.Tensor, Any]:
    """The first ``samples`` images and labels of ``batches`` (all of them when there are fewer
    but at least ``minimum``, by default ``samples``), on the CPU. Labels are a tensor, or a
    list with one entry per image (a detector's boxes) when the batches carry lists.

    Raises:
        UserError: the batches hold fewer than ``minimum`` images.
    """
    needed = samples if minimum is None else minimum
    xs: list[torch.Tensor] = []
    ys: list[Any] = []
    have = 0
    for x, y in batches:
        xs.append(x[: samples - have].detach().cpu().float())
        ys.append(y[: samples - have] if isinstance(y, list) else y[: samples - have].detach().cpu())
        have += len(xs[-1])
        if have >= samples:
            break
    if have < needed:
        raise UserError(f"calibration needs {needed} images but the data gave only {have}; lower the samples")
    if ys and isinstance(ys[0], list):
        return torch.cat(xs), [label for part in ys for label in part]
    return torch.cat(xs), torch.cat(ys)


def _pick(labels: Any, index: torch.Tensor) -> Any:
    """``labels`` at ``index``: a tensor's rows, or a per-image list's entries."""
    if isinstance(labels, list):
        return [labels[int(i)] for i in index]
    return labels[index]
