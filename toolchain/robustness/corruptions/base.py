"""The corruption contract, the ``CORRUPTIONS`` registry and the severity-table helpers.

A corruption is a small object with a ``name``, a ``family`` and
``__call__(x, severity, generator)``: ``x`` is a float32 batch ``(N, C, H, W)`` in [0, 1] on any
device, ``severity`` is 1..5 (already validated), ``generator`` is a seeded *CPU*
``torch.Generator``. Every random draw happens on the CPU from that generator (large uniform
draws through a numpy PCG64 it seeds, see ``rand``) and is then moved to ``x.device``, so the
same seed gives the same pixels on CPU and GPU.

Parameter tables. Where ImageNet-C defines a corruption (Hendrycks & Dietterich, ICLR 2019,
reference implementation ``hendrycks/robustness``: ``make_cifar_c.py`` and
``make_imagenet_c.py``), each corruption carries both published tables: the CIFAR-10-C one
(designed for 32x32) is used for images whose longer side is <= 64 px, the ImageNet-C one
(designed for 224x224) above that. Parameters measured in pixels (blur radii, displacements)
are multiplied by ``spatial_scale`` = image side / table side (32 or 224), so a 28x28 or 64x64
image sees the same *relative* effect the table intended for 32x32.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar, TypeVar

import numpy as np
import torch

from toolchain.registry import Registry

FAMILIES = ("noise", "blur", "weather", "digital", "driving")
SMALL_IMAGE_MAX_SIDE = 64  # <= this: CIFAR-10-C table (32 px reference); above: ImageNet-C (224 px)
SEVERITIES = (1, 2, 3, 4, 5)
CHUNK_BYTES = 1 << 21  # input bytes per chunk, see Corruption.__call__

_NUMPY_DRAW_MIN = 4096  # below this the generator hand-off costs more than it saves

P = TypeVar("P")


class Corruption(ABC):
    """Base class: subclasses set ``name``/``family`` and implement ``_apply``.

    ``__call__`` is the template method: it hands ``_apply`` a float32 view of the batch and
    clamps the result, so every corruption returns valid pixels the same way.

    Attributes:
        name: registry name, e.g. ``"fog"``.
        family: one of ``FAMILIES``.
        needs_color: True when the corruption is defined on colour (e.g. ``saturate``); on a
            one-channel batch it is documented per corruption what happens instead.
    """

    name: ClassVar[str] = "?"
    family: ClassVar[str] = "?"
    needs_color: ClassVar[bool] = False
    #: It moves pixels (a warp): a per-pixel label map must move with the image
    #: (:func:`toolchain.robustness.corruptions.corrupt_labels`).
    moves_pixels: ClassVar[bool] = False

    chunk_bytes: ClassVar[int] = CHUNK_BYTES

    def __call__(self, x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
        """Corrupt a validated float batch ``(N, C, H, W)`` in [0, 1]; returns same shape/device.

        The batch is processed in chunks of about ``chunk_bytes`` of input: every corruption
        makes several passes over its data, and a chunk whose temporaries stay in the CPU cache
        runs up to twice as fast per image as a large batch streaming through memory; it also
        bounds the temporary memory of a huge batch to a few chunks. The chunking depends only
        on the image shape, so the same seed still gives the same pixels on any device.
        """
        step = max(1, self.chunk_bytes // max(1, x[0].numel() * x.element_size()))
        if step >= x.shape[0]:
            return self._apply_into(x, severity, generator, None)
        out = torch.empty_like(x)
        for start in range(0, x.shape[0], step):
            self._apply_into(x[start : start + step], severity, generator, out[start : start + step])
        return out

    def _apply_into(
        self, x: torch.Tensor, severity: int, generator: torch.Generator, out: torch.Tensor | None
    ) -> torch.Tensor:
        """``_apply`` clamped to [0, 1], written into ``out`` when given (else into a new tensor).

        A corruption that can build its result in ``out`` itself overrides this: one buffer
        and one pass fewer per chunk (and a fresh buffer adds page faults to the pass filling it).
        """
        result = self._apply(x, severity, generator)
        return result.clamp_(0.0, 1.0) if out is None else torch.clamp(result, 0.0, 1.0, out=out)

    @abstractmethod
    def _apply(self, x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
        """The corruption itself, on a batch; the result is clamped to [0, 1] by ``__call__``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, family={self.family!r})"


CORRUPTIONS: Registry[Corruption] = Registry("corruption")


def register(cls: type[Corruption]) -> type[Corruption]:
    """Class decorator: instantiate ``cls`` once and register it under ``cls.name``."""
    if cls.family not in FAMILIES:
        raise ValueError(f"corruption {cls.name!r} has unknown family {cls.family!r}")
    CORRUPTIONS.register(cls.name)(cls())
    return cls


# --------------------------------------------------------------------------- severity tables


def is_small(x: torch.Tensor) -> bool:
    """True when the CIFAR-10-C table applies (longer side <= 64 px)."""
    return max(x.shape[-2:]) <= SMALL_IMAGE_MAX_SIDE


def pick(x: torch.Tensor, severity: int, small: Sequence[P], large: Sequence[P]) -> P:
    """The severity's parameters from the CIFAR-10-C (``small``) or ImageNet-C (``large``) table."""
    return (small if is_small(x) else large)[severity - 1]


def spatial_scale(x: torch.Tensor) -> float:
    """Image side / side the chosen table was designed for (32 or 224)."""
    side = math.sqrt(x.shape[-2] * x.shape[-1])
    return side / (32.0 if is_small(x) else 224.0)


# --------------------------------------------------------------------------- random draws


def rand(shape: Sequence[int], generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) float32 from the CPU generator, moved to ``like``'s device (CPU/GPU agree).

    Large draws come from numpy's PCG64 seeded with 63 bits taken from ``generator``: same
    determinism, but 1.6x faster than torch's CPU Mersenne twister, and the per-pixel noises
    spend a large part of their time drawing.
    """
    shape = tuple(shape)
    count = math.prod(shape)
    if count < _NUMPY_DRAW_MIN:
        return torch.rand(shape, generator=generator).to(like.device)
    values = np.random.Generator(_pcg64(generator)).random(count, dtype=np.float32)
    return torch.from_numpy(values).view(shape).to(like.device)


def _pcg64(generator: torch.Generator) -> np.random.PCG64:
    """numpy's PCG64 seeded with 63 bits taken from ``generator`` (same seed, same stream)."""
    return np.random.PCG64(int(torch.randint(0, 2**63 - 1, (1,), generator=generator)))


def rand_int16(shape: Sequence[int], generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Uniform int16 over all 65536 values (raw PCG64 bits seeded from ``generator``), on ``like``'s device.

    For per-pixel coin flips whose probability needs no finer step than 1/65536: half the bytes
    of a float draw and no conversion, so the draw and the comparisons after it run ~2x faster.
    """
    shape = tuple(shape)
    count = math.prod(shape)
    words = _pcg64(generator).random_raw(-(-count // 4))  # 64 random bits = four int16
    return torch.from_numpy(words.view(np.int16)[:count]).view(shape).to(like.device)


def int16_threshold(probability: float) -> int:
    """The int16 value below which a :func:`rand_int16` draw falls with ``probability`` (to 1/65536)."""
    return -32768 + round(min(max(probability, 0.0), 1.0) * 65536)


def randn(shape: Sequence[int], generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Standard normal drawn on the CPU generator, moved to ``like``'s device."""
    return torch.randn(tuple(shape), generator=generator).to(like.device)


def uniform(
    shape: Sequence[int], low: float, high: float, generator: torch.Generator, like: torch.Tensor
) -> torch.Tensor:
    """Uniform [low, high) on the CPU generator, moved to ``like``'s device."""
    return low + (high - low) * rand(shape, generator, like)
