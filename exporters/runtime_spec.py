"""How a runtime declares itself: what its runner is built from, and whether it can run here.

Each runtime's own file registers one :class:`RuntimeSpec` in :data:`RUNTIMES` (the package's
:mod:`exporters.runtimes` imports those files), so a new runtime is one file plus its import
there; the pipeline, ``robustprune doctor`` and the recipe checks read these declarations and
never branch on a runtime's name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from exporters.registry import Registry

if TYPE_CHECKING:
    from exporters.base import Runner

__all__ = ["RUNTIMES", "RuntimeSpec", "Source"]

#: What a runner is built from: the PyTorch model, an ONNX file, or a prebuilt engine (made
#: by the pipeline's engine stage; such a runtime never builds one as a side effect).
Source = Literal["model", "onnx", "engine"]


def _always() -> str | None:
    return None


@dataclass(frozen=True)
class RuntimeSpec:
    """A runtime as the toolchain uses it.

    Attributes:
        name: the registry name (``validate.runtimes``, ``bench.runtimes``).
        factory: builds a runner from keyword arguments (see :func:`exporters.runtimes.build_runner`).
        source: what the runner is built from (:data:`Source`).
        missing: cheap and side-effect free (no TensorRT import, no CUDA initialisation): why the
            runtime cannot run on this machine, or None if it can.
        description: one line for listings.
    """

    name: str
    factory: Callable[..., Runner]
    source: Source
    missing: Callable[[], str | None] = field(default=_always)
    description: str = ""


def register(spec: RuntimeSpec) -> RuntimeSpec:
    """Add ``spec`` to :data:`RUNTIMES` under its name (a duplicate name is an error)."""
    return RUNTIMES.register(spec.name)(spec)


RUNTIMES: Registry[RuntimeSpec] = Registry("runtime")
