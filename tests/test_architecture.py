"""The folders are the architecture: imports follow the data flow, and there is no circle.

Read from the source with ``ast`` (nothing is imported): every ``import`` and ``from ... import``
of the project's packages, at module level or inside functions, is an edge; ``from package
import submodule`` is an edge to the submodule.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("toolchain", "exporters", "calibration")


def _modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def _graph() -> dict[str, set[str]]:
    modules = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    targets.append(full if full in modules else node.module)
            for target in targets:
                resolved = resolve(target)
                if resolved is not None and resolved != name:
                    graph[name].add(resolved)
        graph.setdefault(name, set())
    return graph


GRAPH = _graph()


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_there_is_no_import_circle() -> None:
    assert _cycles(GRAPH) == []


def test_the_cycle_finder_finds_a_planted_circle() -> None:
    planted = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(planted) == [["a", "b", "c"]]


def _imports_of(prefix: str) -> dict[str, set[str]]:
    return {m: deps for m, deps in GRAPH.items() if m == prefix or m.startswith(prefix + ".")}


def _outside(deps: set[str], allowed: tuple[str, ...]) -> set[str]:
    project = {d for d in deps if d.split(".")[0] in PACKAGES}
    return {d for d in project if not any(d == a or d.startswith(a + ".") for a in allowed)}


@pytest.mark.parametrize(
    ("package", "allowed"),
    [
        # Libraries usable on their own: nothing of the pipeline.
        ("exporters", ("exporters",)),
        ("calibration", ("calibration", "exporters")),
        # The report reads typed stage results; it imports nothing above it.
        (
            "toolchain.report",
            (
                "toolchain.report",
                "toolchain.recipe",
                "toolchain.recipe_train",
                "toolchain.recipe_prune",
                "toolchain.rundir",
                "toolchain.runlock",
                "toolchain.killpoints",
                "toolchain.errors",
                "exporters.errors",
            ),
        ),
        # Tasks are objectives and evaluators: no suites, attacks, training or pruning.
        (
            "toolchain.tasks",
            (
                "toolchain.tasks",
                "toolchain.report.schema",
                "toolchain.recipe",
                "toolchain.errors",
                "toolchain.registry",
                "exporters",
            ),
        ),
    ],
)
def test_lower_layers_import_nothing_above_them(package: str, allowed: tuple[str, ...]) -> None:
    upward = {m: sorted(_outside(deps, allowed)) for m, deps in _imports_of(package).items()}
    assert {m: d for m, d in upward.items() if d} == {}


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("toolchain.robustness", ("toolchain.pruning", "toolchain.stages", "toolchain.pipeline")),
        ("toolchain.models", ("toolchain.training", "toolchain.pruning", "toolchain.stages")),
        ("toolchain.data", ("toolchain.training", "toolchain.pruning", "toolchain.stages")),
        ("toolchain.stages", ("toolchain.pipeline", "toolchain.cli", "toolchain.commands")),
        ("toolchain.recipe", ("toolchain.pruning", "toolchain.tasks", "toolchain.models")),
    ],
)
def test_imports_follow_the_data_flow(package: str, forbidden: tuple[str, ...]) -> None:
    wrong = {
        m: sorted(d for d in deps if any(d == f or d.startswith(f + ".") for f in forbidden))
        for m, deps in _imports_of(package).items()
    }
    assert {m: d for m, d in wrong.items() if d} == {}


def test_every_stage_is_a_module_with_a_constant_name_in_pipeline_order() -> None:
    from toolchain.rundir import STAGE_NAMES
    from toolchain.stages import STAGES

    assert tuple(stage.name for stage in STAGES) == STAGE_NAMES
    for stage in STAGES:
        assert (ROOT / "toolchain" / "stages" / f"{stage.name}.py").is_file()
        assert all(upstream in STAGE_NAMES[: STAGE_NAMES.index(stage.name)] for upstream in stage.after)


def test_the_dense_and_pruned_stage_map_is_written_once() -> None:
    """``{"dense": "train", "pruned": "finetune"}`` lives in the run layout only."""
    writers = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Dict):
                pairs = {
                    (k.value, v.value)
                    for k, v in zip(node.keys, node.values)
                    if isinstance(k, ast.Constant) and isinstance(v, ast.Constant)
                }
                if ("dense", "train") in pairs or ("pruned", "finetune") in pairs:
                    writers.append(name)
    assert writers == []  # rundir spells it with its constants: MODEL_STAGES = {DENSE: TRAIN, ...}
