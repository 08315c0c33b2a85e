"""The run directory: one folder per stage, artifacts written atomically, a record per stage.

A stage is finished when its ``stage.json`` exists and carries the key (a hash of the recipe
sections the stage depends on, chained through its upstream stages) that the current recipe
gives it. ``stage.json`` is written last, so an interrupted stage is simply re-run.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from toolchain.errors import RunDirectoryError

MARKER = "run.json"


def chain_key(*parts: str) -> str:
    """Combine an upstream stage key with section hashes into this stage's key."""
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: Path, payload: Any) -> None:
    """Write JSON atomically (indent 2, keys in insertion order)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


class RunDir:
    """``runs/<name>/``: the marker file, the resolved recipe and one sub-folder per stage."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def open(cls, root: str | Path, recipe_dump: dict[str, Any]) -> RunDir:
        """Create the folder, or reuse it if it is a robustprune run directory.

        Raises:
            RunDirectoryError: ``root`` is a file, or a non-empty folder that robustprune did
                not create (so it is never written into).
        """
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise RunDirectoryError(f"--out {str(root)!r} is a file; pass a folder for the run")
        if root.is_dir() and any(root.iterdir()) and not (root / MARKER).is_file():
            raise RunDirectoryError(
                f"{str(root)!r} is not empty and is not a robustprune run directory; "
                "choose another --out (nothing was written)"
            )
        run = cls(root)
        root.mkdir(parents=True, exist_ok=True)
        if not (root / MARKER).is_file():
            write_json(root / MARKER, {"tool": "robustprune", "created": time.time()})
        with atomic_path(root / "recipe.yaml") as tmp:
            tmp.write_text(yaml.safe_dump(recipe_dump, sort_keys=False))
        return run

    def stage_dir(self, stage: str) -> Path:
        path = self.root / stage
        path.mkdir(parents=True, exist_ok=True)
        return path

    def finished(self, stage: str, key: str) -> dict[str, Any] | None:
        """The stage's record if it finished with this key and its artifacts still exist."""
        record_path = self.root / stage / "stage.json"
        if not record_path.is_file():
            return None
        try:
            record = read_json(record_path)
        except (OSError, json.JSONDecodeError):
            return None
        if record.get("key") != key:
            return None
        if not all((self.root / stage / name).exists() for name in record.get("artifacts", [])):
            return None
        return record

    def finish(
        self, stage: str, key: str, artifacts: list[str], result: dict[str, Any], seconds: float
    ) -> None:
        """Record the stage as done; written last so a crash before it re-runs the stage."""
        write_json(
            self.root / stage / "stage.json",
            {"key": key, "artifacts": artifacts, "seconds": round(seconds, 3), "result": result},
        )

    def invalidate(self, stage: str) -> None:
        record = self.root / stage / "stage.json"
        if record.exists():
            record.unlink()
