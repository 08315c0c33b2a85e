"""Common corruptions (ImageNet-C + driving conditions) as batched, seeded torch ops.

Public API::

    corrupt(name, x, severity, seed=0) -> Tensor       # one corruption at one severity
    corrupt_labels(name, labels, like, severity, seed)  # a label map moved as corrupt() moves pixels
    list_corruptions(family=None) -> list[str]         # registered names, sorted
    CORRUPTIONS                                         # the registry (name -> Corruption)
    grid.save_corruption_grid(image, path, ...)         # PNG contact sheet for a human check

Every corruption takes a float batch ``(N, C, H, W)`` in [0, 1] (1 or 3 channels, 28-224 px)
on any device and returns the same shape, dtype and device, clamped to [0, 1]. Randomness comes
from a CPU ``torch.Generator`` seeded with ``seed`` and is moved to the input's device, so a
seed fixes the pixels on CPU and GPU alike. Parameter tables: see ``base.py``.
"""

from __future__ import annotations

import torch

from toolchain.errors import UserError
from toolchain.robustness.corruptions import blur, digital, driving, noise, weather  # noqa: F401  (register)
from toolchain.robustness.corruptions.base import CORRUPTIONS, FAMILIES, SEVERITIES, Corruption

__all__ = [
    "CORRUPTIONS",
    "FAMILIES",
    "SEVERITIES",
    "Corruption",
    "corrupt",
    "corrupt_labels",
    "list_corruptions",
]


def list_corruptions(family: str | None = None) -> list[str]:
    """Registered corruption names, sorted; only those of ``family`` when given.

    Raises:
        UserError: ``family`` is not one of ``FAMILIES``.
    """
    if family is None:
        return CORRUPTIONS.names()
    if family not in FAMILIES:
        raise UserError(f"unknown corruption family {family!r}; known: {', '.join(FAMILIES)}")
    return [name for name in CORRUPTIONS.names() if CORRUPTIONS.get(name).family == family]


def corrupt(name: str, x: torch.Tensor, severity: int, seed: int = 0) -> torch.Tensor:
    """Apply corruption ``name`` at ``severity`` to a batch of images.

    Args:
        name: a registered corruption (see :func:`list_corruptions`).
        x: float tensor ``(N, C, H, W)`` (or one image ``(C, H, W)``) with values in [0, 1].
        severity: 1 (mild) .. 5 (severe).
        seed: fixes every random draw; the same seed gives the same pixels on any device.

    Returns:
        The corrupted batch: same shape, dtype and device as ``x``, values in [0, 1].

    Raises:
        UnknownNameError: ``name`` is not registered (the message lists the known names).
        UserError: bad severity, non-float tensor, or wrong number of dimensions.
    """
    corruption = CORRUPTIONS.get(name)
    if isinstance(severity, bool) or not isinstance(severity, int) or severity not in SEVERITIES:
        raise UserError(f"corruption severity must be an integer 1..5, got {severity!r}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        kind = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise UserError(
            f"corrupt() needs a float tensor in [0, 1], got {kind}; use x.float() / 255 for uint8"
        )
    if x.dim() not in (3, 4):
        raise UserError(f"corrupt() needs (N, C, H, W) or (C, H, W), got shape {tuple(x.shape)}")
    batch = x.unsqueeze(0) if x.dim() == 3 else x
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    with torch.no_grad():
        # Contiguous NCHW: the filters slice planes and rows; a channels-last or permuted input
        # (a decoded HWC photo) would make every pass strided and several times slower.
        out = corruption(batch.detach().to(torch.float32).contiguous(), severity, generator)
    out = out.to(x.dtype)
    return out.squeeze(0) if x.dim() == 3 else out


def corrupt_labels(
    name: str, labels: torch.Tensor, like: torch.Tensor, severity: int, seed: int = 0
) -> torch.Tensor:
    """A per-pixel label map ``(N, H, W)`` moved as ``corrupt(name, like, severity, seed)`` moves
    the pixels of ``like``, nearest neighbour; unchanged for a corruption that moves no pixel.

    The corruption is run, with the same seed and so the same random draws, on two images
    whose pixels hold their own x and y coordinates: what comes out at each pixel is where its
    content came from (exact for a warp: bilinear sampling of a linear ramp returns the sampled
    position, and reflection at the border reflects it), and the label there is taken.
    """
    if not CORRUPTIONS.get(name).moves_pixels:
        return labels
    n, _, h, w = like.shape
    source = []
    for size, shape in ((w, (1, 1, 1, w)), (h, (1, 1, h, 1))):
        ramp = ((torch.arange(size, device=like.device, dtype=torch.float32) + 0.5) / size).view(shape)
        moved = corrupt(name, ramp.expand(like.shape).contiguous(), severity, seed=seed)[:, 0]
        source.append((moved * size - 0.5).round().long().clamp_(0, size - 1))
    index = source[1] * w + source[0]
    return labels.flatten(1).gather(1, index.flatten(1)).view(n, h, w)
