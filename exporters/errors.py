"""Typed user errors, shared by every package of the project.

:class:`UserError` is the base of every error caused by the user's input (a recipe, a file, a
name, a shape): the CLI turns it into one line on stderr and exit code 2, and each message says
what went wrong and what to do about it. Internal bugs are *not* UserErrors: they keep their
traceback. The base classes live here, in the lowest library, so that ``exporters``,
``calibration`` and ``toolchain`` share them without importing ``toolchain``
(:mod:`toolchain.errors` re-exports them beside the pipeline's own errors).
"""

from __future__ import annotations

import errno
from collections.abc import Sequence

__all__ = [
    "ExportError",
    "InputSpecError",
    "ParityError",
    "ResourceError",
    "RuntimeUnavailableError",
    "UnknownNameError",
    "UserError",
    "resource_error",
]


class UserError(Exception):
    """Bad input from the user: a recipe, a file, a name, a shape. Exit code 2."""


class UnknownNameError(UserError, KeyError):
    """A registry lookup failed."""

    def __init__(self, kind: str, name: str, known: Sequence[str]) -> None:
        self.kind, self.name, self.known = kind, name, list(known)
        super().__init__(f"unknown {kind} {name!r}; known: {', '.join(self.known) or '(none)'}")

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0])


class InputSpecError(UserError, ValueError):
    """A runner got a batch of the wrong shape, dtype or range."""


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


class ResourceError(UserError):
    """The machine ran out of memory or disk space: neither a bad file nor a bug."""


# How out-of-memory reads in the libraries' own exception types (torch, ONNX Runtime, protobuf).
_OUT_OF_MEMORY = (
    "out of memory",
    "can't allocate memory",
    "failed to allocate memory",
    "bad_alloc",
    "bad allocation",
    "cannot allocate memory",
)
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def resource_error(exc: BaseException, doing: str) -> ResourceError | None:
    """``exc`` as a :class:`ResourceError` when it says memory or disk ran out, else None.

    Code that turns a library's broad failure into "a truncated or unreadable file" asks this
    first, so that a full disk or an exhausted memory is named as such.

    Args:
        exc: what the library raised.
        doing: what was being done, for the message ("loading model.onnx").
    """
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    if isinstance(exc, MemoryError) or any(marker in text.lower() for marker in _OUT_OF_MEMORY):
        return ResourceError(
            f"out of memory while {doing} ({first}); lower the batch size (data.batch_size, "
            "validate.batch_size, quantize.samples), close other programs, or use a machine with more memory"
        )
    if (isinstance(exc, OSError) and exc.errno in _DISK_FULL) or "no space left on device" in text.lower():
        return ResourceError(f"no space left on device while {doing} ({first}); free disk space and re-run")
    return None
