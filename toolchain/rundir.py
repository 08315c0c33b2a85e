"""The run directory: its layout, atomic writes, checksums, and a record per stage.

:class:`RunLayout` owns every path of a run directory (``runs/<name>/``): one folder per stage,
named by the constants below (the only place stage names are spelled), each with its artifacts
and its ``stage.json`` record, plus the run's reports. :class:`RunDir` is a layout opened for
writing: it holds the folder's lock and records finished stages.

A stage is finished when its ``stage.json`` exists, carries the key the current run gives it
(everything the stage read: its recipe sections, its upstream stages' keys and the digests of
its input files), names as its upstream the very runs of its upstream stages that are on disk
now (each finished stage gets a fresh ``run_id``, so a stage that re-ran makes every later one
run again), and every artifact it lists still has the sha256 recorded there. ``stage.json`` is
written last, so an interrupted stage is simply re-run, and an artifact truncated or changed
after the fact makes its stage (and what follows) run again instead of being read. One process
at a time holds the folder (:mod:`toolchain.runlock`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
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

# The stages, in pipeline order: each is a folder of the run directory (toolchain.stages).
TRAIN = "train"
PRUNE = "prune"
FINETUNE = "finetune"
EXPORT = "export"
QUANTIZE = "quantize"
ENGINE = "engine"
VALIDATE = "validate"
BENCH = "bench"
STAGE_NAMES = (TRAIN, PRUNE, FINETUNE, EXPORT, QUANTIZE, ENGINE, VALIDATE, BENCH)

# The two models of a run, as the report names them, and the stage that saves each.
DENSE = "dense"
PRUNED = "pruned"
MODEL_STAGES: Mapping[str, str] = {DENSE: TRAIN, PRUNED: FINETUNE}

MODEL_FILE = "model.pt"
CHECKPOINT_FILE = ".checkpoint.pt"
RECORD_FILE = "stage.json"
PARITY_FILE = "parity.json"
QUANTIZE_RECORD = "quantize.json"
ENGINE_RECORD = "engines.json"
EVALUATIONS_FILE = "evaluations.json"
LATENCY_FILE = "latency.json"


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


class RunLayout:
    """Every path of a run directory, read or written; nothing else spells them.

    Attributes:
        root: the run directory.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def stage_path(self, stage: str) -> Path:
        """The stage's folder (not created)."""
        return self.root / stage

    def record_path(self, stage: str) -> Path:
        """The stage's ``stage.json``."""
        return self.root / stage / RECORD_FILE

    def checkpoint(self, stage: str, loop: str | None = None) -> Path:
        """The per-epoch training checkpoint of a stage that trains (of one of its training
        ``loop``s, for a stage with several: ``.checkpoint-<loop>.pt``)."""
        if loop is None:
            return self.root / stage / CHECKPOINT_FILE
        return self.root / stage / f".checkpoint-{loop}.pt"

    def model_file(self, stage: str) -> Path:
        """The model a model stage saves (train, prune, finetune)."""
        return self.root / stage / MODEL_FILE

    def model_of(self, role: str) -> Path:
        """The saved PyTorch model of ``dense`` or ``pruned``."""
        return self.model_file(MODEL_STAGES[role])

    def onnx(self, role: str) -> Path:
        """The exported ONNX file of ``dense`` or ``pruned``."""
        return self.root / EXPORT / f"{role}.onnx"

    def end_to_end_onnx(self, role: str) -> Path:
        """The ``export.end_to_end`` file of ``dense`` or ``pruned``: post-processing in the graph."""
        return self.root / EXPORT / f"{role}.e2e.onnx"

    @property
    def parity(self) -> Path:
        return self.root / EXPORT / PARITY_FILE

    def quantized(self, file: str) -> Path:
        """An INT8 file the quantize stage wrote (by its recorded file name)."""
        return self.root / QUANTIZE / file

    @property
    def quantize_record(self) -> Path:
        return self.root / QUANTIZE / QUANTIZE_RECORD

    def engine_file(self, file: str) -> Path:
        """A TensorRT engine the engine stage built (by its recorded file name)."""
        return self.root / ENGINE / file

    @property
    def engine_record(self) -> Path:
        return self.root / ENGINE / ENGINE_RECORD

    @property
    def evaluations(self) -> Path:
        return self.root / VALIDATE / EVALUATIONS_FILE

    @property
    def latency(self) -> Path:
        return self.root / BENCH / LATENCY_FILE

    @property
    def report_json(self) -> Path:
        return self.root / "report.json"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def recipe_file(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def marker(self) -> Path:
        return self.root / MARKER

    def is_run_directory(self) -> bool:
        """Whether robustprune created this folder (its marker file is there)."""
        return self.marker.is_file()

    def record(self, stage: str) -> dict[str, Any] | None:
        """The stage's ``stage.json`` as written, or None when missing or unreadable."""
        try:
            record = read_json(self.record_path(stage))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        return record if isinstance(record, dict) else None

    def result(self, stage: str) -> dict[str, Any] | None:
        """The stage's recorded result (its ``result`` key), or None without a record."""
        record = self.record(stage)
        result = record.get("result") if record is not None else None
        return result if isinstance(result, dict) else None

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
        record = self.record(stage)
        checksums = record.get("checksums") if record is not None else None
        if not isinstance(checksums, dict) or name not in checksums:
            return False
        return not self.damaged(stage, name, checksums[name])


class RunDir(RunLayout):
    """``runs/<name>/`` opened by a run: the marker file, the resolved recipe and one sub-folder
    per stage, with the records that say which stages finished.

    An opened run directory holds its lock until :meth:`close` (or the end of a ``with``
    block, or the process).
    """

    def __init__(self, root: str | Path, lock: RunLock | None = None) -> None:
        super().__init__(root)
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
        foreign = root.is_dir() and not RunLayout(root).is_run_directory()
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
            if not run.is_run_directory():
                write_json(run.marker, {"tool": "robustprune", "created": time.time()})
            with atomic_path(run.recipe_file) as tmp:
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

    def finished(self, stage: str, key: str, upstream: Mapping[str, str | None]) -> dict[str, Any] | None:
        """The stage's record if it finished with this key, after the current runs of its
        upstream stages, and with its artifacts intact; else None.

        Args:
            stage: the stage's name.
            key: the key the current run gives it.
            upstream: upstream stage name -> the ``run_id`` of its record on disk now.
        """
        record = self.record(stage)
        if record is None or record.get("key") != key:
            return None
        if record.get("upstream") != dict(upstream):
            log.info("stage %s: an upstream stage ran again since; running it again", stage)
            return None
        checksums = record.get("checksums")
        if not isinstance(checksums, dict) or set(checksums) != set(record.get("artifacts", [])):
            log.info("stage %s: no checksums recorded for its artifacts; running it again", stage)
            return None
        for name, expected in checksums.items():
            if self.damaged(stage, name, expected):
                return None
        return record

    def run_id(self, stage: str) -> str | None:
        """The ``run_id`` of the stage's record on disk (None without one)."""
        record = self.record(stage)
        value = record.get("run_id") if record is not None else None
        return value if isinstance(value, str) else None

    def finish(
        self,
        stage: str,
        key: str,
        upstream: Mapping[str, str | None],
        artifacts: list[str],
        result: dict[str, Any],
        seconds: float,
    ) -> None:
        """Record the stage as done, with each artifact's sha256, the runs of its upstream
        stages and a fresh ``run_id`` of its own; written last so a crash before it re-runs
        the stage."""
        checksums = {name: sha256_file(self.root / stage / name) for name in artifacts}
        write_json(
            self.record_path(stage),
            {
                "key": key,
                "run_id": uuid.uuid4().hex,
                "upstream": dict(upstream),
                "artifacts": artifacts,
                "checksums": checksums,
                "seconds": round(seconds, 3),
                "result": result,
            },
        )
