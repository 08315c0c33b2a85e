"""Export and runtimes: every runtime is a :class:`exporters.base.Runner`."""

from exporters.base import InputSpec, Runner

__all__ = ["InputSpec", "Runner"]
