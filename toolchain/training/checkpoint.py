"""Per-epoch checkpoints of a training run, so a killed run loses at most one epoch.

A checkpoint holds everything the next epoch depends on: model and optimiser states, the
epoch reached and the history so far, every random generator (torch's global one, the
loader's shuffling, the attacks'), the loss's own state (the mixed-noise generator) and the
pruning method's state (scores, masks, gates). Resuming from it continues bit for bit as if
the run had never stopped (on CPU). It is written atomically, read with
``torch.load(weights_only=True)`` (tensors and plain values only, never code), and ignored
unless its key matches the run's (a changed recipe never resumes from a stale checkpoint).
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

FORMAT = "robustprune.train-checkpoint/1"


@dataclass(frozen=True)
class TrainCheckpoint:
    """Where a training run checkpoints, and the key that must match to resume.

    Attributes:
        path: the checkpoint file (its folder must exist or be creatable).
        key: what the run depends on (the stage key and which loop of the stage).
    """

    path: Path
    key: str

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None when there is none, it is unreadable, or its key differs."""
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a torn or foreign file: start over rather than fail
            log.warning("ignoring unreadable training checkpoint %s: %s", self.path, exc)
            return None
        if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("key") != self.key:
            log.info("training checkpoint %s belongs to another run; starting over", self.path)
            return None
        return state

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state`` atomically (a temporary file renamed into place)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # The run directory's temporary-file pattern: a killed save is cleaned up on the next open.
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.close(fd)
        try:
            torch.save({"format": FORMAT, "key": self.key, **state}, tmp)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def rng_states(*generators: torch.Generator | None) -> dict[str, Any]:
    """torch's global CPU (and CUDA) generator and the given ones."""
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "generators": [g.get_state() if g is not None else None for g in generators],
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng(states: dict[str, Any], *generators: torch.Generator | None) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    for generator, state in zip(generators, states["generators"]):
        if generator is not None and state is not None:
            generator.set_state(state)
