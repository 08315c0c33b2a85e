"""The stage interface: a name, what it reads, how it runs and how a finished run is loaded.

A stage's key covers everything it reads: its recipe sections (and the seed), its upstream
stages' keys, and what :meth:`Stage.key_parts` adds (the input files' digests for ``train``,
the installed TensorRT for ``engine``). The pipeline (:mod:`toolchain.pipeline`) runs a stage
unless it finished with that key after the current runs of its upstream stages.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from toolchain.recipe import Recipe
from toolchain.report.stage_results import StageResult
from toolchain.rundir import chain_key
from toolchain.stages.context import StageContext
from toolchain.stages.inputs import InputDigests

__all__ = ["Stage", "StageOutput"]


@dataclass
class StageOutput:
    """What a stage that ran leaves: its artifact file names (in its folder) and its result."""

    artifacts: list[str]
    result: StageResult


class Stage(ABC):
    """One step of the pipeline.

    Attributes:
        name: the stage's folder and key name (one of :data:`toolchain.rundir.STAGE_NAMES`).
        sections: the recipe sections it reads.
        after: the stages whose outputs it reads; its key chains on their keys, and it runs
            again whenever one of them ran again.
        parallel: under torchrun, runs on every rank (rank 0 alone records it); otherwise on
            rank 0 only.
    """

    name: ClassVar[str]
    sections: ClassVar[tuple[str, ...]]
    after: ClassVar[tuple[str, ...]] = ()
    parallel: ClassVar[bool] = False

    def key(self, recipe: Recipe, inputs: InputDigests, keys: Mapping[str, str]) -> str:
        """This stage's key, given the keys of the stages before it."""
        return chain_key(
            *(keys[stage] for stage in self.after),
            recipe.section_hash(*self.sections),
            *self.key_parts(recipe, inputs),
        )

    def key_parts(self, recipe: Recipe, inputs: InputDigests) -> tuple[str, ...]:
        """What the key covers besides recipe sections and upstream keys (nothing by default)."""
        return ()

    @abstractmethod
    def run(self, ctx: StageContext) -> StageOutput:
        """Do the stage's work, write its artifacts into its folder, and say what they are."""

    def load(self, ctx: StageContext) -> None:  # noqa: B027  # optional override
        """Restore into ``ctx`` what later stages need from this one when it is skipped as up
        to date (its model); nothing by default."""
