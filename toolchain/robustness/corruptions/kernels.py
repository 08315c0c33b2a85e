"""Compiled CPU kernels (numba) for the corruptions torch cannot express without many passes.

Eager torch spends one pass through memory per op (plus per-op overhead); these kernels work one
output row at a time with every intermediate in a row buffer that stays in L1:

- zoom blur: every zoom factor's row resampling and column gather into the output row;
- JPEG: one MCU row (16 image rows) from RGB to decoded RGB (see ``_numba_jpeg.jpeg_rgb``);
- separable (Gaussian) correlation, motion blur's per-image shifted sum, the reflection warp of
  ``elastic_transform``, and Poisson alias sampling in one pass.

At 224 px the corruptions using them are 1.05-2.1x faster than on the torch path, at 1920x1080
up to 14x, where the torch path's passes leave the cache (``bench/bench_corruptions.py --parts
kernels``, bench/results/corruption_kernels.json).

numba is optional at run time: :data:`AVAILABLE` says whether the kernels can be used, and the
callers keep their torch path for CUDA tensors and for machines without numba. The kernels
release the GIL, so images or planes are spread over ``torch.get_num_threads()`` Python threads.
"""

from __future__ import annotations

import importlib
import importlib.util
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from types import ModuleType
from typing import Any

import numpy as np
import torch

# numba is imported on the first kernel call, not here: importing it costs ~0.15 s, which every
# command that loads the corruptions would otherwise pay. A broken or missing install (numba is a
# dependency) leaves AVAILABLE false and the callers on their torch path.
AVAILABLE = importlib.util.find_spec("numba") is not None


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the kernels can take these tensors: numba present, all float32 on the CPU."""
    return AVAILABLE and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


def _compiled(module: str = "_numba") -> ModuleType:
    """A kernels module (importing numba; each kernel compiles on first use, cached on disk)."""
    return importlib.import_module(f"toolchain.robustness.corruptions.{module}")


def zoom_blur(x: torch.Tensor, tables: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Zoom blur of a contiguous float32 CPU batch ``(N, C, H, W)`` with stacked lerp tables.

    ``tables``: ``(r0, r1, fr)`` of shape ``(Z, H)`` and ``(c0, c1, fc)`` of shape ``(Z, W)``
    (int32 indices, float32 weights).
    """
    n, c, h, w = x.shape
    out = torch.empty_like(x)
    split = [x.reshape(n * c, h, w).numpy(), out.view(n * c, h, w).numpy()]
    # the int32 indices are never negative: read as uint32, numba adds no wraparound to the gathers
    shared = [t.numpy().view(np.uint32) if t.dtype == torch.int32 else t.numpy() for t in tables]
    _run_split(_compiled().zoom_planes, split, shared)
    return out


def separable(x: torch.Tensor, tables: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Separable correlation of every ``(H, W)`` plane of a contiguous float32 CPU tensor
    ``(..., H, W)``; ``tables``: ``(rows, taps_v, cols, taps_h)``, see ``_numba.separable_planes``."""
    h, w = x.shape[-2:]
    out = torch.empty_like(x)
    split = [x.reshape(-1, h, w).numpy(), out.view(-1, h, w).numpy()]
    _run_split(_compiled().separable_planes, split, [t.numpy() for t in tables])
    return out


def shifted_sum(x: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum of whole-pixel shifts per image of a contiguous float32 CPU batch, edges
    replicated; ``oy``, ``ox``: ``(N, T)`` int32, ``weights``: ``(T,)``. See ``_numba.shifted_sum``."""
    out = torch.empty_like(x)
    split = [x.numpy(), out.numpy(), oy.numpy(), ox.numpy()]
    _run_split(_compiled().shifted_sum, split, [weights.numpy()])
    return out


def warp_reflect(x: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
    """Bilinear warp by a per-pixel shift ``(N, 2, H, W)`` (dx, dy) of a contiguous float32 CPU
    batch, reflection padding (``F.grid_sample``'s numbers). See ``_numba.warp_reflect``."""
    out = torch.empty_like(x)
    _run_split(_compiled().warp_reflect, [x.numpy(), out.numpy(), field.numpy()], [])
    return out


def poisson_alias(
    x: torch.Tensor, u: torch.Tensor, prob: torch.Tensor, alias: torch.Tensor, k: int
) -> torch.Tensor:
    """Alias-sampled Poisson counts of a contiguous float32 CPU tensor from uniform draws ``u``
    (same shape); see ``ops.poisson_levels`` for the tables and ``_numba.poisson_alias``."""
    out = torch.empty_like(x)
    split = [x.view(-1).numpy(), u.view(-1).numpy(), out.view(-1).numpy()]
    _run_split(_compiled().poisson_alias, split, [prob.numpy(), alias.numpy(), k])
    return out


def jpeg_rgb(x: torch.Tensor, out: torch.Tensor, tables: tuple[np.ndarray, ...]) -> torch.Tensor:
    """JPEG round trip of a contiguous float32 CPU RGB batch ``(N, 3, H, W)`` into ``out`` (same
    shape, contiguous), clamped to [0, 1]; see ``_numba_jpeg.jpeg_rgb`` for ``tables``."""
    _run_split(_compiled("_numba_jpeg").jpeg_rgb, [x.numpy(), out.numpy()], list(tables))
    return out


def _run_split(kernel: Any, split: list[np.ndarray], shared: list[Any]) -> None:
    """``kernel(*split, *shared)``, with ``split``'s arrays cut along their first axis into one
    share per ``torch.get_num_threads()`` thread (the kernels release the GIL)."""
    n = split[0].shape[0]
    workers = max(1, min(torch.get_num_threads(), n))
    if workers == 1:
        kernel(*split, *shared)
        return
    bounds = [n * k // workers for k in range(workers + 1)]
    with ThreadPoolExecutor(workers) as pool:
        jobs = [pool.submit(kernel, *(a[lo:hi] for a in split), *shared) for lo, hi in pairwise(bounds)]
        for job in jobs:
            job.result()
