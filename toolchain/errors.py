"""User-facing errors. The CLI turns any ``UserError`` into one line on stderr and exit code 2.

Every message names what is wrong and how to fix it. Internal bugs are *not* UserErrors: they
keep their traceback. The base classes (``UserError``, ``UnknownNameError``, ``InputSpecError``)
are defined in :mod:`exporters.errors`, shared with the libraries; the pipeline's own are here.
"""

from __future__ import annotations

from exporters.errors import InputSpecError, ResourceError, UnknownNameError, UserError

__all__ = [
    "AnnotationError",
    "CheckpointError",
    "DataNotFoundError",
    "InputSpecError",
    "RecipeError",
    "ResourceError",
    "RunDirectoryError",
    "RunLockedError",
    "TrainingDivergedError",
    "UnknownNameError",
    "UserError",
]


class RecipeError(UserError):
    """The recipe does not validate (unknown key, wrong type, bad value)."""


class DataNotFoundError(UserError):
    """A dataset's files are missing; the message carries the install hint."""


class AnnotationError(UserError):
    """A detection label is unusable (a box outside its image or of negative size, an unknown
    class, an image without its label file, an unreadable annotation file); the message names
    the file and line (or the COCO annotation id) and the fix."""


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable, or does not fit the architecture."""


class RunDirectoryError(UserError):
    """The run directory cannot be used as asked (e.g. it belongs to another recipe)."""


class RunLockedError(RunDirectoryError):
    """Another live robustprune process holds the run directory's lock."""


class TrainingDivergedError(UserError):
    """The training loss became NaN or infinite: the recipe's settings (its learning rate,
    usually), not a bug."""
