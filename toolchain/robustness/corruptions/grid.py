"""A PNG contact sheet of corruptions x severities, so a person can see what each one does."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from toolchain.errors import UserError


def save_corruption_grid(
    image: torch.Tensor,
    path: str | Path,
    names: Sequence[str] | None = None,
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    seed: int = 0,
    cell_px: int = 96,
    dpi: int = 100,
) -> Path:
    """Write a labelled grid: one row per corruption, columns ``clean`` then each severity.

    The figure is exactly ``(1 + len(severities)) * cell_px`` by ``len(names) * cell_px`` pixels
    (no tight bounding box), so callers and tests can rely on the size.

    Args:
        image: ``(C, H, W)`` float in [0, 1], 1 or 3 channels.
        path: where to write the PNG (parent directories are created).
        names: corruptions to show; all registered ones by default.
        severities: severity columns.
        seed: passed to :func:`corrupt`.
        cell_px, dpi: cell size in pixels and the PNG resolution.

    Returns:
        The written path.

    Raises:
        UserError: ``image`` is not a ``(C, H, W)`` tensor with 1 or 3 channels.
        UnknownNameError: a name is not registered.
    """
    # Imported here: matplotlib is slow to import and only this helper needs it; the Agg
    # canvas is used directly so no global backend is switched for the caller.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from toolchain.robustness.corruptions import corrupt, list_corruptions

    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] not in (1, 3):
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise UserError(f"save_corruption_grid needs one (C, H, W) image with C in (1, 3), got {shape}")
    names = list(names) if names is not None else list_corruptions()
    batch = image.detach().float().cpu().unsqueeze(0)
    rows, cols = len(names), 1 + len(severities)
    fig = Figure(figsize=(cols * cell_px / dpi, rows * cell_px / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    grey = image.shape[0] == 1
    for r, name in enumerate(names):
        tiles = [batch] + [corrupt(name, batch, s, seed=seed) for s in severities]
        titles = ["clean"] + [f"s{s}" for s in severities]
        for c, (tile, title) in enumerate(zip(tiles, titles)):
            ax = fig.add_subplot(rows, cols, r * cols + c + 1)
            pixels = tile[0].permute(1, 2, 0).clamp(0, 1).numpy()
            ax.imshow(
                pixels[..., 0] if grey else pixels,
                cmap="gray" if grey else None,
                vmin=0,
                vmax=1,
                interpolation="nearest",
            )
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{name} {title}" if c == 0 else title, fontsize=6, pad=2)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.12 / rows, wspace=0.05, hspace=0.25)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
