"""Digests of the files a run reads besides its recipe, for the stage keys.

A recipe names files whose content can change under the same text: the checkpoint in
``model.checkpoint``, the images under a dataset's folder, the source of a ``module:callable``
factory. The train stage's key covers a digest of each (and every later stage's key chains on
it), so overwriting any of them makes the run train again instead of reporting the old result.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from toolchain.data import DataBundle
from toolchain.models.external import TORCHVISION_PREFIX
from toolchain.recipe import Recipe
from toolchain.rundir import sha256_file

__all__ = ["InputDigests", "folder_digest", "input_digests"]


@dataclass(frozen=True)
class InputDigests:
    """sha256 digests of a run's input files; ``None`` where the recipe reads none of that kind.

    Attributes:
        checkpoint: the bytes of ``model.checkpoint``.
        data: the dataset folder's file list with sizes and modification times.
        factory: the source file of a ``module:callable`` model factory.
    """

    checkpoint: str | None = None
    data: str | None = None
    factory: str | None = None

    def key_parts(self) -> tuple[str, ...]:
        """What the train stage's key adds for them (nothing for a kind not read)."""
        named = (("checkpoint", self.checkpoint), ("data", self.data), ("factory", self.factory))
        return tuple(f"{kind}={digest}" for kind, digest in named if digest is not None)


def folder_digest(root: str | Path) -> str:
    """A digest of every file under ``root``: relative path, size and modification time (ns).

    Reading sizes and times, not contents, keeps it fast on large image folders while still
    seeing any file added, removed, replaced or rewritten.
    """
    base = Path(root)
    digest = hashlib.sha256()
    entries = []
    for folder, _, files in os.walk(base, followlinks=True):
        for name in files:
            path = Path(folder) / name
            try:
                stat = path.stat()
            except OSError:  # a dangling link: its absence is part of the folder's state
                entries.append((str(path.relative_to(base)), -1, -1))
                continue
            entries.append((str(path.relative_to(base)), stat.st_size, stat.st_mtime_ns))
    for entry in sorted(entries):
        digest.update(repr(entry).encode())
    return digest.hexdigest()


def factory_source(arch: str) -> Path | None:
    """The source file of a ``module:callable`` factory (None for zoo and torchvision models, or
    a module without a file). The module is the one the recipe names, and the run imports it
    anyway to build the model; normally it is already imported."""
    if arch.startswith(TORCHVISION_PREFIX) or ":" not in arch:
        return None
    name = arch.partition(":")[0]
    module = sys.modules.get(name)
    if module is None:
        try:
            module = importlib.import_module(name)
        except ImportError:
            return None  # building the model reports it, with the fix
    source = getattr(module, "__file__", None)
    return Path(source) if source else None


def input_digests(recipe: Recipe, data: DataBundle) -> InputDigests:
    """The digests of ``recipe``'s input files (its data already loaded, so its factory imported)."""
    checkpoint = recipe.model.checkpoint
    source = factory_source(recipe.model.arch)
    return InputDigests(
        checkpoint=sha256_file(Path(checkpoint)) if checkpoint else None,
        data=folder_digest(data.source) if data.source else None,
        factory=sha256_file(source) if source is not None and source.is_file() else None,
    )
