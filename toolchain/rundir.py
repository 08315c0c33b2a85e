"""The run directory: one folder per stage, artifacts written atomically, a record per stage.

A stage is finished when its ``stage.json`` exists, carries the key (a hash of the recipe
sections the stage depends on, chained through its upstream stages) that the current recipe
gives it, and every artifact it lists still has the sha256 recorded there. ``stage.json`` is
written last, so an interrupted stage is simply re-run, and an artifact truncated or changed
after the fact makes its stage run again instead of being read. One process at a time holds
the folder (:mod:`toolchain.runlock`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from toolchain.errors import RunDirectoryError
from toolchain.killpoints import killpoint
from toolchain.runlock import LOCK_FILE, RunLock

log = logging.getLogger(__name__)

MARKER = "run.json"
#: Suffix of every file being written atomically (under a name starting with ".").
TMP_SUFFIX = ".tmp"


def chain_key(*parts: str) -> str:
    """Combine an upstream stage key with section hashes into this stage's key."""
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _fsync(tmp_path)  # the data is on disk before the name points at it (power loss)
        killpoint(f"write:{path.name}")
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _fsync(path: Path) -> None:
    if path.is_file():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def sha256_file(path: Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: Path, payload: Any) -> None:
    """Write JSON atomically (indent 2, keys in insertion order)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


class RunDir:
    """``runs/<name>/``: the marker file, the resolved recipe and one sub-folder per stage.

    An opened run directory holds its lock until :meth:`close` (or the end of a ``with``
    block, or the process).
    """

    def __init__(self, root: Path, lock: RunLock | None = None) -> None:
        self.root = root
        self._lock = lock

    @classmethod
    def open(cls, root: str | Path, recipe_dump: dict[str, Any]) -> RunDir:
        """Create the folder, or reuse it if it is a robustprune run directory, and lock it.

        Raises:
            RunDirectoryError: ``root`` is a file, a non-empty folder that robustprune did not
                create (so it is never written into), or cannot be written.
            RunLockedError: another running robustprune holds the folder.
        """
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise RunDirectoryError(f"--out {str(root)!r} is a file; pass a folder for the run")
        foreign = root.is_dir() and not (root / MARKER).is_file()
        if foreign and any(p.name != LOCK_FILE for p in root.iterdir()):
            raise RunDirectoryError(
                f"{str(root)!r} is not empty and is not a robustprune run directory; "
                "choose another --out (nothing was written)"
            )
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunDirectoryError(
                f"cannot create run directory {str(root)!r} ({exc.strerror}); choose a writable --out"
            ) from exc
        run = cls(root, RunLock.acquire(root))
        try:
            run._remove_torn_writes()
            if not (root / MARKER).is_file():
                write_json(root / MARKER, {"tool": "robustprune", "created": time.time()})
            with atomic_path(root / "recipe.yaml") as tmp:
                tmp.write_text(yaml.safe_dump(recipe_dump, sort_keys=False))
        except BaseException:
            run.close()
            raise
        return run

    def _remove_torn_writes(self) -> None:
        """Delete the temporary files of atomic writes that a killed process never renamed:
        with the lock held, no live process is writing them."""
        torn = [p for p in self.root.rglob(f".*{TMP_SUFFIX}") if p.is_file()]
        for path in torn:
            path.unlink()
        if torn:
            log.info("removed %d temporary file(s) left by an interrupted run in %s", len(torn), self.root)

    def close(self) -> None:
        """Release the folder's lock (idempotent)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stage_dir(self, stage: str) -> Path:
        path = self.root / stage
        path.mkdir(parents=True, exist_ok=True)
        return path

    def finished(self, stage: str, key: str) -> dict[str, Any] | None:
        """The stage's record if it finished with this key and its artifacts are intact."""
        record_path = self.root / stage / "stage.json"
        if not record_path.is_file():
            return None
        try:
            record = read_json(record_path)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        if not isinstance(record, dict) or record.get("key") != key:
            return None
        checksums = record.get("checksums")
        if not isinstance(checksums, dict) or set(checksums) != set(record.get("artifacts", [])):
            log.info("stage %s: no checksums recorded for its artifacts; running it again", stage)
            return None
        for name, expected in checksums.items():
            if self.damaged(stage, name, expected):
                return None
        return record

    def damaged(self, stage: str, name: str, expected: str | None) -> bool:
        """True (with a log line) when artifact ``name`` is missing or not the file recorded."""
        path = self.root / stage / name
        if not path.is_file():
            log.info("stage %s: artifact %s is missing; running the stage again", stage, name)
            return True
        if sha256_file(path) != expected:
            log.warning(
                "stage %s: %s does not match the sha256 in stage.json (truncated or changed); "
                "running the stage again",
                stage,
                name,
            )
            return True
        return False

    def verify(self, stage: str, name: str) -> bool:
        """Whether ``stage``'s artifact ``name`` matches the checksum its record holds."""
        try:
            record = read_json(self.root / stage / "stage.json")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return False
        checksums = record.get("checksums") if isinstance(record, dict) else None
        if not isinstance(checksums, dict) or name not in checksums:
            return False
        return not self.damaged(stage, name, checksums[name])

    def finish(
        self, stage: str, key: str, artifacts: list[str], result: dict[str, Any], seconds: float
    ) -> None:
        """Record the stage as done, with each artifact's sha256; written last so a crash
        before it re-runs the stage."""
        checksums = {name: sha256_file(self.root / stage / name) for name in artifacts}
        write_json(
            self.root / stage / "stage.json",
            {
                "key": key,
                "artifacts": artifacts,
                "checksums": checksums,
                "seconds": round(seconds, 3),
                "result": result,
            },
        )
