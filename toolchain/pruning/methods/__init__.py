"""Pruning methods behind one registry: ``METHODS.get(name)(prune_config).run(model, job)``.

Importing this package registers every method (one file each).
"""

from toolchain.pruning.methods import (  # noqa: F401  (importing registers them)
    bap,
    dnr,
    gated,
    hydra,
    iterative,
    lowrank,
    mrs,
)
from toolchain.pruning.methods.base import (
    METHODS,
    PruneJob,
    PruneOutcome,
    PruneResult,
    PruningMethod,
    check_sections,
    method_settings,
    prune_model,
    run_method,
)

__all__ = [
    "METHODS",
    "PruneJob",
    "PruneOutcome",
    "PruneResult",
    "PruningMethod",
    "check_sections",
    "method_settings",
    "prune_model",
    "run_method",
]
