"""Pruning methods behind one registry: ``METHODS.get(name)(prune_config).run(model, job)``.

Importing this package registers every method (one file each).
"""

from toolchain.pruning.methods import bap, dnr, gated, hydra, iterative, mrs  # noqa: F401  (registers them)
from toolchain.pruning.methods.base import (
    METHODS,
    PruneJob,
    PruneOutcome,
    PruneResult,
    PruningMethod,
    prune_model,
    run_method,
)

__all__ = [
    "METHODS",
    "PruneJob",
    "PruneOutcome",
    "PruneResult",
    "PruningMethod",
    "prune_model",
    "run_method",
]
