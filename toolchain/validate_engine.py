"""``robustprune validate``: the validate section of a recipe on one exported ONNX file.

The file may come from a run directory (``runs/<name>/export/pruned.onnx``, or an INT8 file in
``runs/<name>/quantize/``): then its PyTorch
model is found beside it and white-box attacks are crafted on it and replayed on the engine
(mode ``transfer``). A user's own ONNX file gets the clean, corruption and black-box parts
only; the skipped attacks are listed in the report.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from exporters.batching import any_batch
from exporters.onnx import read_onnx_metadata
from exporters.runtimes import build_runner
from toolchain import preflight
from toolchain.data import load_data
from toolchain.errors import RunDirectoryError, RunLockedError, UserError
from toolchain.models import trusted_builder
from toolchain.pruning import load_pruned
from toolchain.recipe import Recipe
from toolchain.report.assemble import environment, finish, models_section
from toolchain.report.schema import EngineInfo, Models, Report
from toolchain.report.writer import mark_stale, mark_stale_before_start, write_report
from toolchain.robustness.suite import evaluate
from toolchain.rundir import EXPORT, MODEL_STAGES, QUANTIZE, RunDir, RunLayout
from toolchain.runlock import RunLock
from toolchain.training import make_loader

log = logging.getLogger(__name__)


def _torch_model(engine: Path, metadata: dict[str, str], example: Any, recipe: Recipe) -> nn.Module | None:
    """The PyTorch model an exported file of a run directory was made from (by its ``model``
    metadata key), checked against its stage record; None for a file outside a run directory."""
    layout = RunLayout(engine.parent.parent)
    stage = MODEL_STAGES.get(metadata.get("model", ""))
    if engine.parent.name not in (EXPORT, QUANTIZE) or not layout.is_run_directory() or stage is None:
        return None
    checkpoint = layout.model_file(stage)
    if not checkpoint.is_file():
        return None
    if not layout.verify(stage, checkpoint.name):
        raise UserError(
            f"{str(checkpoint)!r} does not match the sha256 its stage.json recorded (truncated, changed, "
            "or its stage never finished); re-run `robustprune run` on that run directory to rebuild it"
        )
    model, _ = load_pruned(checkpoint, trusted_builder(recipe), example)
    return model.eval()


def _run_tolerance(run_root: RunLayout, recipe: Recipe) -> float:
    """The pruning tolerance the engine's own run used (its recipe.yaml), else ``recipe``'s."""
    try:
        return float(yaml.safe_load(run_root.recipe_file.read_text())["prune"]["tolerance"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        return recipe.prune.tolerance


def validate_engine(engine: Path, recipe: Recipe, out: Path, *, progress: bool = True) -> Report:
    """Evaluate ``engine`` with ``recipe.validate`` on ``recipe.data`` and write the reports into ``out``.

    The previous report in ``out`` is marked stale before anything else; report.json is written last.

    A file of a run directory must be the one its stage recorded (sha256), and that run
    directory is held (its lock) while it is validated.

    Raises:
        UserError: the file is missing or not ONNX, changed since its stage recorded it, its
            input does not match the data, or a name in the recipe is unknown.
        RunLockedError: a ``run`` is using the file's run directory.
    """
    mark_stale_before_start(out)  # first: bad input refused below leaves no old verdict in ``out``
    if not engine.is_file():
        raise UserError(f"engine {str(engine)!r} not found; pass the path to an exported .onnx file")
    if engine.suffix != ".onnx":
        raise UserError(f"engine {str(engine)!r}: only ONNX files are validated here (got {engine.suffix!r})")
    lock = _hold_run_directory(engine)
    try:
        return _validate(engine, recipe, out, progress)
    finally:
        if lock is not None:
            lock.release()


def _hold_run_directory(engine: Path) -> RunLock | None:
    """For a file of a run directory (its export or quantize folder): that directory's lock,
    held while the file is validated (a ``run`` there would rewrite it and delete the
    validation's temporary files), once the file is checked against its stage record.

    Raises:
        RunLockedError: a ``run`` is using the run directory.
        UserError: the file is not the one its stage recorded (changed, truncated, or never
            written by the stage).
    """
    layout = RunLayout(engine.parent.parent)
    if engine.parent.name not in (EXPORT, QUANTIZE) or not layout.is_run_directory():
        return None
    try:
        lock: RunLock | None = RunLock.acquire(layout.root)
    except RunLockedError:
        raise
    except RunDirectoryError:  # a read-only copy: nothing can rewrite it either
        log.warning("cannot lock %s (read-only); validating without its lock", layout.root)
        lock = None
    if not layout.verify(engine.parent.name, engine.name):
        if lock is not None:
            lock.release()
        raise UserError(
            f"{str(engine)!r} does not match the sha256 its stage.json recorded (changed after its stage "
            "finished, truncated, or not written by it); re-run `robustprune run` on that run directory, "
            "or copy the file out of it to validate it as your own"
        )
    return lock


def _validate(engine: Path, recipe: Recipe, out: Path, progress: bool) -> Report:
    """:func:`validate_engine` once the file is found (and its run directory held)."""
    preflight.check_names(recipe)
    runner = any_batch(build_runner("onnxruntime", path=engine, threads=recipe.validate.threads))
    metadata = read_onnx_metadata(engine)
    d = recipe.data
    data = load_data(
        d.dataset,
        root=d.root,
        image_size=d.image_size or runner.input_spec.width,
        train_samples=1,
        val_samples=d.val_samples,
        seed=recipe.data_seed,
        task=recipe.task,
    )
    preflight.check_attack_classes(recipe, data.num_classes)
    spec = runner.input_spec
    height, width = data.input_hw
    if (spec.channels, spec.height, spec.width) != (data.channels, height, width):
        raise UserError(
            f"engine takes {spec.channels}x{spec.height}x{spec.width} images but dataset {data.name!r} gives "
            f"{data.channels}x{height}x{width}; "
            "set data.image_size or use the matching dataset"
        )
    model = _torch_model(engine, metadata, torch.zeros(spec.shape(1)), recipe)
    if model is None:
        log.info("no PyTorch model beside %s: white-box and transfer attacks are skipped", engine)
    cfg = recipe.validate
    samples = min(cfg.samples, len(data.val))  # type: ignore[arg-type]
    loader = make_loader(
        torch.utils.data.Subset(data.val, range(samples)),
        cfg.batch_size,
        shuffle=False,
        collate_fn=data.collate,
    )
    run = RunDir.open(out, recipe.model_dump(mode="json"))
    try:
        mark_stale(run.root)  # again, locked: a run that held the folder a moment ago may have finished
        evaluations = evaluate(
            model,
            {"onnxruntime": runner},
            loader,
            cfg,
            task=recipe.task,
            model_name=metadata.get("model", "engine"),
            class_names=data.class_names,
            progress=progress,
        )
        run_root = RunLayout(engine.parent.parent)
        sizes = models_section(run_root, _run_tolerance(run_root, recipe)) if model is not None else Models()
        report = Report(
            recipe_sha256=recipe.sha256(),
            name=recipe.name,
            dataset=data.name,
            engine=EngineInfo(path=str(engine), metadata=metadata, pytorch_reference=model is not None),
            environment=environment(cfg.threads, [e.device for e in evaluations]),
            # An engine from a run directory keeps its run's sizes, so MACs gates still apply.
            models=sizes,
            evaluations=evaluations,
        )
        finish(report, recipe.gates, allow_unverified=recipe.allow_unverified)
        write_report(run.root, report)
        return report
    finally:
        run.close()
