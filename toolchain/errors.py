"""User-facing errors. The CLI turns any ``UserError`` into one line on stderr and exit code 2.

Every message names what is wrong and how to fix it. Internal bugs are *not* UserErrors: they
keep their traceback.
"""

from __future__ import annotations

from collections.abc import Sequence


class UserError(Exception):
    """Bad input from the user: a recipe, a file, a name, a shape. Exit code 2."""


class RecipeError(UserError):
    """The recipe does not validate (unknown key, wrong type, bad value)."""


class UnknownNameError(UserError, KeyError):
    """A registry lookup failed."""

    def __init__(self, kind: str, name: str, known: Sequence[str]) -> None:
        self.kind, self.name, self.known = kind, name, list(known)
        super().__init__(f"unknown {kind} {name!r}; known: {', '.join(self.known) or '(none)'}")

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0])


class DataNotFoundError(UserError):
    """A dataset's files are missing; the message carries the install hint."""


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable, or does not fit the architecture."""


class InputSpecError(UserError, ValueError):
    """A runner got a batch of the wrong shape, dtype or range."""


class RunDirectoryError(UserError):
    """The run directory cannot be used as asked (e.g. it belongs to another recipe)."""


class RunLockedError(RunDirectoryError):
    """Another live robustprune process holds the run directory's lock."""
