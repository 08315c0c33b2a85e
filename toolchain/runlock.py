"""One robustprune process at a time per run directory: an advisory lock file.

Two pipelines writing into one folder would interleave their artifacts and stage records, so
the run directory holds ``.lock``, locked with ``fcntl.flock`` for as long as the run lasts.
The kernel releases a ``flock`` when its holder exits in any way, SIGKILL included, so a lock
can never outlive its process; the file also records the holder's PID and host, which names
the running process in the refusal and tells a later run that it is taking over from a
process that died (a log line, then the run resumes). ``flock`` is local to one machine: on a
network file system shared by several hosts it may not exclude a process on another host.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
from pathlib import Path

from toolchain.errors import RunDirectoryError, RunLockedError

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"


class RunLock:
    """A held lock on one run directory; :meth:`release` (or process exit) frees it."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, root: Path) -> RunLock:
        """Lock ``root`` (which must exist) for this process.

        Raises:
            RunLockedError: another live process holds the lock.
            RunDirectoryError: the lock file cannot be created (read-only folder, no permission).
        """
        path = root / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunDirectoryError(
                f"cannot write in run directory {str(root)!r} ({exc.strerror}); "
                "choose a writable --out (nothing was written)"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd) or "another process"
            os.close(fd)
            raise RunLockedError(
                f"run directory {str(root)!r} is in use by a running robustprune ({holder}); "
                "wait for it to finish, or pass another --out"
            ) from None
        previous = _holder(fd)
        if previous:
            # Only a holder that exited without releasing (SIGKILL, power loss) leaves its name.
            log.warning("run directory %s: taking over the lock of %s, no longer running", root, previous)
        os.ftruncate(fd, 0)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n".encode(), 0)
        return cls(path, fd)

    def release(self) -> None:
        """Clear the holder's name and unlock (idempotent)."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def in_use(root: Path) -> bool:
    """Whether a live process holds ``root``'s lock (creates nothing; False when it cannot tell)."""
    try:
        fd = os.open(root / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # closing also drops the shared lock taken to test
    return False


def _holder(fd: int) -> str:
    """The holder line a lock file carries ('' when none)."""
    return os.pread(fd, 256, 0).decode(errors="replace").strip()
