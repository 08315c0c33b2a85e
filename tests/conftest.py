"""Shared fixtures: a tiny end-to-end recipe run once per session."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from toolchain.report.schema import Report

# Small enough to run the whole pipeline in well under a minute on 2 cores, large enough that
# the models learn something (accuracy is asserted above chance).
TINY_RECIPE: dict[str, Any] = {
    "version": 1,
    "name": "tiny",
    "seed": 0,
    "data": {
        "dataset": "signs",
        "image_size": 32,
        "train_samples": 600,
        "val_samples": 120,
        "batch_size": 50,
    },
    "model": {"arch": "convnet"},
    "train": {
        "epochs": 8,
        "lr": 0.1,
        "loss": "pgd",
        "warmup_epochs": 2,
        "attack": {"eps": "2/255", "step_size": "1/255", "steps": 1},
    },
    "prune": {
        "criterion": "adv-taylor",
        "target": {"macs_reduction": 2.0},
        "steps": 2,
        "importance_batches": 2,
        "attack": {"eps": "2/255", "step_size": "1/255", "steps": 1},
        "finetune_between": {"epochs": 1, "lr": 0.01, "loss": "clean"},
        "bn_recalibration_batches": 4,
    },
    "finetune": {
        "epochs": 1,
        "lr": 0.01,
        "loss": "trades",
        "attack": {"eps": "2/255", "step_size": "1/255", "steps": 1},
    },
    "export": {"parity_samples": 60},
    "validate": {
        "samples": 60,
        "batch_size": 30,
        "attacks": [
            {"name": "pgd", "eps": "4/255", "steps": 3},
            {"name": "square", "eps": "4/255", "queries": 10, "samples": 20},
        ],
        "corruptions": {"names": ["gaussian_noise", "fog"], "severities": [1, 5]},
    },
    "bench": {"batch_sizes": [1], "warmup": 1, "iterations": 3},
    "gates": [
        {"metric": "models.pruned.macs_reduction", "op": ">=", "threshold": 1.9},
        {"metric": "evaluations[model=pruned,runtime=onnxruntime].parity.top1_agreement", "threshold": 1.0},
    ],
}


def quantize_stage(
    tmp_path: Path,
    model: torch.nn.Module,
    images: torch.Tensor,
    quantize: dict[str, Any],
    *,
    bench: dict[str, Any] | None = None,
) -> list[Any]:
    """The quantize stage's records for ``model`` (exported to a run directory under ``tmp_path``,
    8-px 3-channel images), calibrated on ``images`` in batches of 32 labelled 0, 1, 2, ...
    ``quantize`` is the recipe section (enabled, clean calibration only, unless it says otherwise)."""
    from exporters.base import InputSpec
    from exporters.onnx import export_onnx
    from toolchain.recipe import recipe_from_dict
    from toolchain.rundir import RunLayout
    from toolchain.stages.quantize import quantize_models

    layout = RunLayout(tmp_path)
    export_onnx(model, layout.onnx("pruned"), input_spec=InputSpec(3, 8, 8))
    batches = [
        (images[i : i + 32], torch.arange(i, i + len(images[i : i + 32])) % 3)
        for i in range(0, len(images), 32)
    ]
    recipe = recipe_from_dict(
        {
            "data": {"dataset": "signs", "image_size": 8},
            "model": {"arch": "convnet"},
            "quantize": {"enabled": True, "calibrations": ["clean"], **quantize},
            "validate": {"attacks": [{"name": "pgd", "eps": "2/255", "steps": 2}], "threads": 1},
            "bench": bench or {"batch_sizes": [1], "iterations": 2, "warmup": 1, "threads": 1},
        }
    )
    return quantize_models(recipe, {"pruned": model}, layout, lambda: batches)


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run on one torch thread, then restore the count.

    Unit tests work on tiny tensors that gain nothing from a second thread, and on a busy
    2-core machine two OpenMP threads wait on each other and ran 10-50x slower (measured).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Module-wide :func:`one_torch_thread`: ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Report]:
    """Run the tiny recipe once; tests read its run directory and report."""
    from toolchain.pipeline import run_pipeline
    from toolchain.recipe import recipe_from_dict

    out = tmp_path_factory.mktemp("e2e") / "run"
    report = run_pipeline(recipe_from_dict(TINY_RECIPE), out, progress=False)
    return out, report
