"""The pipeline's stages, one module each, in order.

``train`` -> ``prune`` -> ``finetune`` -> ``export`` -> ``quantize`` -> ``engine`` ->
``validate`` / ``bench``. Each is a :class:`~toolchain.stages.base.Stage`: a constant name
(a folder of the run directory), the recipe sections and upstream stages it reads, what else
its key covers, and a typed result (:mod:`toolchain.report.stage_results`).
"""

from __future__ import annotations

from toolchain.stages.base import Stage, StageOutput
from toolchain.stages.bench import Bench
from toolchain.stages.context import StageContext
from toolchain.stages.engine import Engine
from toolchain.stages.export import Export
from toolchain.stages.finetune import Finetune
from toolchain.stages.prune import Prune
from toolchain.stages.quantize import Quantize
from toolchain.stages.train import Train
from toolchain.stages.validate import Validate

__all__ = ["STAGES", "Stage", "StageContext", "StageOutput"]

#: Every stage, in the order the pipeline runs them.
STAGES: tuple[Stage, ...] = (
    Train(),
    Prune(),
    Finetune(),
    Export(),
    Quantize(),
    Engine(),
    Validate(),
    Bench(),
)
