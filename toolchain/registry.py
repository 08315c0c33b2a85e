"""The project's one registry class (defined in :mod:`exporters.registry`, re-exported here)."""

from exporters.registry import Registry

__all__ = ["Registry"]
