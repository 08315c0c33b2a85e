"""Typed errors of the export library.

All are :class:`toolchain.errors.UserError` subclasses, so the CLI turns them into one line and
exit code 2; each message says what went wrong and what to do about it. ``InputSpecError`` (a
wrong batch handed to a runner) lives in ``toolchain.errors`` and is re-exported here so
library users find every export-related error in one place.
"""

from __future__ import annotations

from toolchain.errors import InputSpecError, UnknownNameError, UserError

__all__ = [
    "ExportError",
    "InputSpecError",
    "ParityError",
    "RuntimeUnavailableError",
    "UnknownNameError",
    "UserError",
]


class ExportError(UserError):
    """A model could not be exported, or an exported file / engine is missing or unusable."""


class RuntimeUnavailableError(UserError):
    """A runtime's optional dependency (TensorRT, CUDA) is not present on this machine."""


class ParityError(UserError):
    """An exported model's logits differ from the reference model's beyond the tolerance.

    Attributes:
        max_abs_diff: the largest absolute logit difference seen.
        top1_agreement: the fraction of samples whose arg-max class agrees.
    """

    def __init__(self, message: str, *, max_abs_diff: float, top1_agreement: float) -> None:
        super().__init__(message)
        self.max_abs_diff = max_abs_diff
        self.top1_agreement = top1_agreement
