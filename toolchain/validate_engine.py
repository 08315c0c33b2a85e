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
from torch import nn

from exporters.batching import any_batch
from exporters.onnx import read_onnx_metadata
from exporters.runtimes import build_runner
from toolchain import preflight
from toolchain.data import load_data
from toolchain.errors import UserError
from toolchain.models import trusted_builder
from toolchain.pruning import load_pruned
from toolchain.recipe import Recipe
from toolchain.report import SCHEMA
from toolchain.report.assemble import environment, models_section
from toolchain.report.gates import evaluate_gates
from toolchain.robustness.suite import evaluate_model
from toolchain.rundir import MARKER, RunDir, write_json
from toolchain.training import make_loader

log = logging.getLogger(__name__)

# Which stage's model an exported file was made from, by the "model" metadata key.
_STAGE_OF = {"dense": "train", "pruned": "finetune"}


def _torch_model(engine: Path, metadata: dict[str, str], example: Any, recipe: Recipe) -> nn.Module | None:
    run_root = engine.parent.parent
    stage = _STAGE_OF.get(metadata.get("model", ""))
    if engine.parent.name not in ("export", "quantize") or not (run_root / MARKER).is_file() or stage is None:
        return None
    checkpoint = run_root / stage / "model.pt"
    if not checkpoint.is_file():
        return None
    model, _ = load_pruned(checkpoint, trusted_builder(recipe), example)
    return model.eval()


def validate_engine(engine: Path, recipe: Recipe, out: Path, *, progress: bool = True) -> dict[str, Any]:
    """Evaluate ``engine`` with ``recipe.validate`` on ``recipe.data`` and write ``out/report.json``.

    Raises:
        UserError: the file is missing or not ONNX, its input does not match the data, or a
            name in the recipe is unknown.
    """
    if not engine.is_file():
        raise UserError(f"engine {str(engine)!r} not found; pass the path to an exported .onnx file")
    if engine.suffix != ".onnx":
        raise UserError(f"engine {str(engine)!r}: only ONNX files are validated here (got {engine.suffix!r})")
    preflight.check_names(recipe)
    runner = any_batch(build_runner("onnxruntime", path=engine, threads=recipe.validate.threads))
    metadata = read_onnx_metadata(engine)
    d = recipe.data
    data = load_data(
        d.dataset,
        root=d.root,
        image_size=d.image_size or runner.input_spec.height,
        train_samples=1,
        val_samples=d.val_samples,
        seed=recipe.seed,
    )
    spec = runner.input_spec
    if (spec.channels, spec.height) != (data.channels, data.image_size):
        raise UserError(
            f"engine takes {spec.channels}x{spec.height}x{spec.width} images but dataset {data.name!r} gives "
            f"{data.channels}x{data.image_size}x{data.image_size}; "
            "set data.image_size or use the matching dataset"
        )
    model = _torch_model(engine, metadata, torch.zeros(spec.shape(1)), recipe)
    if model is None:
        log.info("no PyTorch model beside %s: white-box and transfer attacks are skipped", engine)
    cfg = recipe.validate
    samples = min(cfg.samples, len(data.val))  # type: ignore[arg-type]
    loader = make_loader(torch.utils.data.Subset(data.val, range(samples)), cfg.batch_size, shuffle=False)
    run = RunDir.open(out, recipe.model_dump(mode="json"))
    evaluations = evaluate_model(
        model,
        {"onnxruntime": runner},
        loader,
        cfg,
        model_name=metadata.get("model", "engine"),
        progress=progress,
    )
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "recipe_sha256": recipe.sha256(),
        "name": recipe.name,
        "dataset": data.name,
        "engine": {"path": str(engine), "metadata": metadata, "pytorch_reference": model is not None},
        "environment": environment(cfg.threads, evaluations),
        # An engine from a run directory keeps its run's sizes, so MACs gates still apply.
        "models": models_section(engine.parent.parent) if model is not None else {},
        "evaluations": evaluations,
        "latency": [],
    }
    report["gates"] = evaluate_gates(report, recipe.gates)
    report["passed"] = all(g["passed"] for g in report["gates"])
    write_json(run.root / "report.json", report)
    return report
