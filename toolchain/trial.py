"""A trial run: the whole pipeline with tiny settings on one architecture, to learn in a minute
whether a model goes through robustprune (``robustprune inspect MODEL --trial``, and what
``bench/zoo.py`` runs for every torchvision classifier).

The trial builds the model for the procedural ``signs`` data at the given image size, does no
dense training, prunes it with the default ``iterative`` method and the ``magnitude`` criterion
to the MACs target in one step, fine-tunes for one epoch on a few images at a negligible
learning rate (so training a pruned model is exercised too: auxiliary heads, BatchNorm), saves
and reloads it between stages, exports both models to ONNX, checks parity, and validates clean
accuracy on PyTorch and ONNX Runtime. Its outcome is one of:

* ``works``: every stage ran, the pruned model meets the MACs target, and ONNX Runtime agrees
  with PyTorch: the same top-1 class on every image, and logits within ``export.parity_atol``
  or, for the large logits of an untrained network, within :data:`PARITY_RTOL` of the largest
  logit (float32 rounding grows with the values), or, where even that is exceeded, no further
  from the same model run in float64 than :data:`FLOAT64_FACTOR` times float32 PyTorch's own
  distance from it (an untrained EfficientNet-B4 pruned and BatchNorm-recalibrated on 8 images
  reaches logits of 8,500; there float32 PyTorch is 136 from float64, ONNX Runtime 9), and
  picks float64's class at least as often as float32 PyTorch does (then a top-1 difference from
  float32 PyTorch is float32's, not the export's);
* ``refused``: robustprune stopped before training with a one-line reason (exit code 2);
* ``failed``: anything else (an exception after training started, a missed target, parity).
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from toolchain.errors import UserError
from toolchain.recipe import Recipe, recipe_from_dict
from toolchain.report.schema import Report
from toolchain.report.stage_results import PruneResult, read_result
from toolchain.rundir import PRUNE, STAGE_NAMES, RunLayout

log = logging.getLogger(__name__)

Outcome = Literal["works", "refused", "failed"]
#: Logit differences allowed relative to the largest logit (float32 keeps about 7 digits).
PARITY_RTOL = 1e-5
#: Beyond that, ONNX Runtime still agrees when it is at most this many times as far from the
#: model run in float64 as float32 PyTorch itself is (the export stage's ``float64`` record).
FLOAT64_FACTOR = 2.0


def trial_recipe(arch: str, image_size: int, reduction: float = 2.0) -> Recipe:
    """The tiny recipe of a trial (see the module docstring)."""
    return recipe_from_dict(
        {
            "version": 1,
            "name": "trial",
            "seed": 0,
            "data": {"dataset": "signs", "image_size": image_size, "train_samples": 8, "val_samples": 8},
            "model": {"arch": arch},
            "train": {"epochs": 0},
            "prune": {
                "method": "iterative",
                "criterion": "magnitude",
                "target": {"macs_reduction": reduction},
                "steps": 1,
                "finetune_between": {"epochs": 0},
                "bn_recalibration_batches": 1,
            },
            # One epoch at a learning rate too small to move the weights: training the pruned
            # model (train-mode BatchNorm, auxiliary heads) is exercised, while the untrained
            # network stays numerically tame (one real step made EfficientNet's logits explode,
            # and parity on exploding values measures the values, not the export).
            "finetune": {"epochs": 1, "lr": 1e-6, "loss": "clean", "schedule": "constant"},
            "export": {"parity_samples": 8},
            "validate": {"samples": 8, "batch_size": 8, "attacks": []},
            "bench": {"enabled": False},
        }
    )


@dataclass
class TrialResult:
    """What a trial found (``asdict`` is its JSON form).

    Attributes:
        arch, image_size: what was tried.
        outcome: ``works``, ``refused`` or ``failed``.
        stage: the stage that failed (``preflight`` for a refusal), or None.
        reason: one line: the refusal or failure, or None.
        dense_macs, macs, macs_reduction, target_met, dense_params: from the prune stage.
        parity_max_abs_diff, logit_scale, top1_agreement: pruned model, PyTorch vs ONNX
            Runtime (``logit_scale``: the largest |logit|).
        float64_torch_diff, float64_engine_diff: when parity exceeded ``export.parity_atol``,
            the largest logit difference of float32 PyTorch and of ONNX Runtime from the
            pruned model run in float64; float64_torch_top1, float64_engine_top1: how often
            each picks float64's class.
        seconds: wall time of the trial.
    """

    arch: str
    image_size: int
    outcome: Outcome
    stage: str | None = None
    reason: str | None = None
    dense_macs: int | None = None
    macs: int | None = None
    macs_reduction: float | None = None
    target_met: bool | None = None
    dense_params: int | None = None
    parity_max_abs_diff: float | None = None
    logit_scale: float | None = None
    top1_agreement: float | None = None
    float64_torch_diff: float | None = None
    float64_engine_diff: float | None = None
    float64_torch_top1: float | None = None
    float64_engine_top1: float | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_trial(arch: str, image_size: int, workdir: str | Path, *, reduction: float = 2.0) -> TrialResult:
    """Run the trial of ``arch`` at ``image_size`` in ``workdir`` (see the module docstring).

    Args:
        arch: ``model.arch`` (zoo name, ``torchvision:<name>`` or ``package.module:callable``).
        image_size: square input side.
        workdir: an empty or missing folder for the run directory.
        reduction: the MACs target.

    Returns:
        The result; exceptions from the pipeline become a ``failed`` outcome with their type and
        first line (the traceback is logged at debug level).
    """
    from toolchain.pipeline import run_pipeline

    started = time.perf_counter()
    run_dir = Path(workdir) / "run"
    result = TrialResult(arch, image_size, "works")
    recipe = trial_recipe(arch, image_size, reduction)
    try:
        report = run_pipeline(recipe, run_dir, progress=False)
    except UserError as exc:
        stage = _failed_stage(run_dir)
        result.outcome, result.stage = ("refused" if stage == "preflight" else "failed"), stage
        result.reason = _first_line(exc)
    except Exception as exc:  # a trial reports any failure instead of stopping the sweep
        log.debug("trial of %s failed:\n%s", arch, traceback.format_exc())
        result.outcome, result.stage = "failed", _failed_stage(run_dir)
        result.reason = f"{type(exc).__name__}: {_first_line(exc)}"
    else:
        _read_report(result, report, run_dir, recipe.export.parity_atol)
    result.seconds = time.perf_counter() - started
    return result


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _failed_stage(run_dir: Path) -> str:
    """The first stage without a record (``preflight`` when the run directory was never made)."""
    if not run_dir.is_dir():
        return "preflight"
    layout = RunLayout(run_dir)
    for stage in STAGE_NAMES:
        if layout.record(stage) is None:
            return stage
    return "report"


def _read_report(result: TrialResult, report: Report, run_dir: Path, atol: float) -> None:
    prune = read_result(RunLayout(run_dir), PRUNE, PruneResult) or PruneResult()
    parity = (report.parity or {}).get("pruned")
    result.dense_macs, result.macs = prune.dense_macs, prune.macs
    result.macs_reduction = prune.macs_reduction
    result.target_met = bool(prune.target_met)
    result.dense_params = prune.dense_params
    if parity is not None:
        result.parity_max_abs_diff = parity.max_abs_diff
        result.logit_scale = parity.reference_max_abs
        result.top1_agreement = parity.top1_agreement
    allowed = max(atol, PARITY_RTOL * (result.logit_scale or 0.0))
    problems = []
    if not result.target_met:
        problems.append(f"MACs reduction {result.macs_reduction:.3f} misses the target")
    diff = result.parity_max_abs_diff
    exact = parity.float64 if parity is not None else None
    if exact is not None:
        result.float64_torch_diff = exact.torch_fp32_max_abs_diff
        result.float64_engine_diff = exact.engine_max_abs_diff
        result.float64_torch_top1 = exact.torch_fp32_top1_agreement
        result.float64_engine_top1 = exact.engine_top1_agreement
    # float64 decides where float32 itself is unreliable: the engine as close to it as PyTorch
    rounding = (
        exact is not None
        and exact.engine_max_abs_diff <= max(atol, FLOAT64_FACTOR * exact.torch_fp32_max_abs_diff)
        and (exact.engine_top1_agreement or 0.0) >= (exact.torch_fp32_top1_agreement or 0.0)
    )
    agree = result.top1_agreement == 1.0 or rounding
    if diff is None or (diff > allowed and not rounding) or not agree:
        problems.append(
            f"ONNX Runtime differs from PyTorch (max |dlogit| {result.parity_max_abs_diff}, "
            f"top-1 agreement {result.top1_agreement})"
        )
    if problems:
        result.outcome, result.stage, result.reason = "failed", "report", "; ".join(problems)
