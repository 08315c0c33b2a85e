"""The INT8 goals, measured: agreement, drops and speed of each INT8 configuration against its FP32 file.

    python bench/bench_int8_goals.py [--cases resnet18,mobilenetv2,segmentation] [--epochs 4]
                                     [--work DIR] [--out bench/results/int8_goals.json]

Each case is ``robustprune run`` on a recipe, so the numbers are the report's own (each INT8
file's ``vs_fp32`` on the validation split, the bench stage's speed ratio on ONNX Runtime's CPU):

* ``resnet18`` and ``mobilenetv2``: the classification quickstart's recipe with that model
  (width 1.0, 32 px ``signs``), pruned at initialisation by weight magnitude to 4x fewer MACs with
  channel counts rounded to 16 and then trained ``--epochs`` epochs with single-step PGD-AT (the
  first clean), as ``bench/latency.py`` trains its INT8 model. Validated on ONNX Runtime (clean,
  the recipe's corruptions, PGD-10 transfer), timed at batch 1 and 32.
* ``segmentation``: the segmentation quickstart's recipe as it is (agreement is per pixel).

Configurations, all calibrated on clean training images: ``auto`` (post-training, the method
chosen on held-out training images), ``auto+mixed`` (the same, with the most sensitive layers kept
in FP32 until held-out agreement reaches 0.99 clean / 0.97 PGD-transfer) and, for the
classifiers, ``qat`` (``--qat-epochs``, 2 by default, of quantisation-aware fine-tuning with the
``rslad`` loss, written in the first run beside ``auto``) and ``qat+mixed`` (the same, written in the
second run: the layers whose rounding costs most held-out agreement are left in float first).
The second run resumes a copy of the first (training is reused). Every choice is made on
training images; the validation split only measures. Each row is judged against the goals
(:data:`GOALS`); a metric that was not measured misses its goal. Cases are merged into ``--out``,
so they can be measured one command at a time. One run each.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from bench_int8 import _cpu_flags  # noqa: E402
from bench_segmentation import _run  # noqa: E402  (one way to run a recipe for a bench)

from toolchain.recipe import QuantizeGate  # noqa: E402

QUICKSTART = Path("deploy_examples/quickstart.yaml")
SEG_QUICKSTART = Path("deploy_examples/segmentation_quickstart.yaml")

#: Goal per ``vs_fp32`` metric: (comparison, threshold), the INT8 gate's defaults. Agreement:
#: top-1 with the FP32 file (per pixel for segmentation); drops: FP32 minus INT8 accuracy.
_GATE = QuantizeGate()
GOALS: dict[str, tuple[str, float | None]] = {
    "top1_agreement": (">=", _GATE.min_agreement),
    "top1_agreement_adversarial": (">=", _GATE.min_adversarial_agreement),
    "clean_drop": ("<=", _GATE.max_clean_drop),
    "attack_drop": ("<=", _GATE.max_pgd_drop),
    "corruption_drop": ("<=", _GATE.max_corruption_drop),
}
#: The speed goal: INT8 at least this many times faster than FP32 at this batch, on these cases.
SPEED_GOAL = {"batch": "32", "at_least": 2.5, "cases": ["resnet18"]}

COMMON = ["quantize.enabled=true", "quantize.method=auto", "quantize.calibrations=[clean]"]
MIXED = ["quantize.target_agreement=0.99", "quantize.target_adversarial_agreement=0.97"]
#: Quantisation-aware fine-tuning epochs of the ``qat`` rows (``--qat-epochs``).
QAT_EPOCHS = 2


def _classifier(arch: str, epochs: int) -> list[str]:
    return [
        f"name=int8_goals_{arch}",
        f"model.arch={arch}",
        "model.width=1.0",
        "train.epochs=0",  # pruned at initialisation, then trained: bench/latency.py's INT8 model
        "prune.round_to=16",
        f"finetune.epochs={epochs}",
        "finetune.lr=0.05",
        "finetune.warmup_epochs=1",
        "validate.runtimes=[onnxruntime]",
        "validate.attacks=[{name: pgd, eps: 4/255, steps: 10}]",
        "bench.batch_sizes=[1, 32]",
        "gates=[]",  # the INT8 gate alone decides the run's verdict
    ]


@dataclass(frozen=True)
class Case:
    """One model: its recipe, the overrides that make it, and the runs (config: overrides) in order."""

    recipe: Path
    overrides: list[str]
    runs: dict[str, list[str]]
    goals: tuple[str, ...] = tuple(GOALS)


def cases(epochs: int, qat_epochs: int = QAT_EPOCHS) -> dict[str, Case]:
    qat = [f"quantize.qat={{epochs: {qat_epochs}, loss: rslad}}"]
    classifier_runs = {"auto": [*COMMON, *qat], "auto+mixed": [*COMMON, *MIXED, *qat]}
    return {
        "resnet18": Case(QUICKSTART, _classifier("resnet18", epochs), classifier_runs),
        "mobilenetv2": Case(QUICKSTART, _classifier("mobilenetv2", epochs), classifier_runs),
        "segmentation": Case(
            SEG_QUICKSTART,
            ["gates=[]"],
            {"auto": COMMON, "auto+mixed": [*COMMON, *MIXED]},
            goals=("top1_agreement",),
        ),
    }


def judge(vs_fp32: dict[str, Any], goals: tuple[str, ...], speed_goal: bool) -> dict[str, dict[str, Any]]:
    """Each goal's threshold, the measured value and whether it was met (unmeasured: missed).

    Args:
        vs_fp32: a report's ``quantization[].vs_fp32``.
        goals: the :data:`GOALS` keys that apply.
        speed_goal: whether :data:`SPEED_GOAL` applies.

    Returns:
        ``{metric: {"op", "threshold", "value", "met"}}``; the speed goal as ``speedup_b<batch>``.
    """
    out = {}
    for metric in goals:
        op, threshold = GOALS[metric]
        value = vs_fp32.get(metric)
        met = value is not None and (value >= threshold if op == ">=" else value <= threshold)
        out[metric] = {"op": op, "threshold": threshold, "value": value, "met": met}
    if speed_goal:
        value = (vs_fp32.get("speedup") or {}).get(SPEED_GOAL["batch"])
        threshold = SPEED_GOAL["at_least"]
        out[f"speedup_b{SPEED_GOAL['batch']}"] = {
            "op": ">=",
            "threshold": threshold,
            "value": value,
            "met": value is not None and value >= threshold,
        }
    return out


def _evaluation(report: dict[str, Any], precision: str, calibration: str | None = None) -> dict[str, Any]:
    return next(
        e
        for e in report["evaluations"]
        if e["model"] == "pruned"
        and e["runtime"] == "onnxruntime"
        and e["precision"] == precision
        and e.get("calibration") == calibration
    )


def _fp32(report: dict[str, Any]) -> dict[str, Any]:
    ev = _evaluation(report, "fp32")
    pgd = next((a for a in ev["attacks"] if a["name"] == "pgd"), {})
    return {
        "clean_accuracy": ev["clean_accuracy"],
        "pgd_transfer_accuracy": pgd.get("accuracy"),
        "corruption_mean_accuracy": ev["corruptions"].get("mean_accuracy"),
        "relative_mce": ev["corruptions"].get("relative_mce"),
        "miou": ev.get("miou"),
        "samples": ev["samples"],
    }


def _rows(name: str, case: Case, config: str, report: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    fp32_mce = _fp32(report)["relative_mce"]
    for q in report.get("quantization", []):
        if q["target"] != "onnxruntime" or q["model"] != "pruned":
            continue
        vs = q["vs_fp32"]
        mixed = q.get("mixed_precision") or {}
        speed = (q.get("speed") or {}).get("batches", {})
        int8_mce = _evaluation(report, "int8", q["calibration"])["corruptions"].get("relative_mce")
        rows.append(
            {
                "config": f"qat{config.removeprefix('auto')}" if q["calibration"] == "qat" else config,
                "calibration": q["calibration"],
                "method": q.get("method"),
                "qat": {k: v for k, v in (q.get("qat") or {}).items() if k in ("epochs", "loss", "init")},
                "fp32_layers": mixed.get("fp32_nodes", []),
                "target_met_on_holdout": mixed.get("met"),
                "holdout_agreement": q.get("holdout_agreement"),
                "methods_agreement": q.get("methods_agreement"),
                "mixed_precision_cost": {b: r.get("mixed_precision_cost") for b, r in speed.items()},
                "fusion": q.get("fusion"),
                "relative_mce": {"fp32": fp32_mce, "int8": int8_mce},
                **{k: vs.get(k) for k in (*GOALS, "speedup", "clean_miou_drop", "attack_miou_drop")},
                "goals": judge(vs, case.goals, name in SPEED_GOAL["cases"]),
            }
        )
    return rows


def measure(name: str, case: Case, work: Path) -> dict[str, Any]:
    """Every run of one case (resumed where ``work`` holds it), and its rows."""
    runs, rows, first = {}, [], None
    for config, overrides in case.runs.items():
        run_dir = work / name / config
        if first is not None and not run_dir.exists():
            shutil.copytree(first, run_dir)  # reuse training, pruning and fine-tuning
        all_overrides = [*case.overrides, *overrides]
        wall, code = _run(case.recipe, all_overrides, run_dir)
        report = json.loads((run_dir / "report.json").read_text())
        runs[config] = {
            "overrides": all_overrides,
            "exit_code": code,
            "passed": report["passed"],
            "failed_gates": [g["metric"] for g in report.get("gates", []) if not g["passed"]],
            "stage_seconds": report["stage_seconds"],
            # this invocation's time: seconds when it resumed finished stages (stage_seconds keep theirs)
            "wall_seconds": round(wall, 1),
        }
        rows += _rows(name, case, config, report)
        first = first or run_dir
        print(json.dumps(runs[config])[:600], flush=True)
    report = json.loads((first / "report.json").read_text())
    return {
        "recipe": str(case.recipe),
        "models": report["models"],
        "fp32": _fp32(report),
        "runs": runs,
        "rows": rows,
        "environment": report["environment"],
    }


def _compute_seconds(runs: dict[str, dict[str, Any]]) -> float:
    """Seconds the case's stages took when they ran, whichever invocation ran them: the shared
    training, pruning, fine-tuning and export once, every run's own quantize, validate and bench."""
    shared = ("train", "prune", "finetune", "export")
    first = next(iter(runs.values()))["stage_seconds"]
    total = sum(first.get(stage, 0.0) for stage in shared)
    for run in runs.values():
        total += sum(s for stage, s in run["stage_seconds"].items() if stage not in shared)
    return round(total, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="resnet18,mobilenetv2")
    parser.add_argument("--epochs", type=int, default=4, help="training epochs of the classifiers")
    parser.add_argument("--qat-epochs", type=int, default=QAT_EPOCHS, help="QAT epochs of the qat rows")
    parser.add_argument("--work", type=Path, help="keep the run directories here (and resume them)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "int8_goals.json")
    args = parser.parse_args()
    known = cases(args.epochs, args.qat_epochs)
    names = args.cases.split(",")
    if unknown := sorted(set(names) - set(known)):
        parser.error(f"unknown cases {unknown}; known: {', '.join(known)}")
    payload = json.loads(args.out.read_text()) if args.out.is_file() else {"benchmark": "int8_goals"}
    payload.update(goals=GOALS, speed_goal=SPEED_GOAL)
    payload.setdefault("cases", {})
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        for name in names:
            start = time.perf_counter()
            result = measure(name, known[name], work)
            qat = f" --qat-epochs {args.qat_epochs}" if args.qat_epochs != QAT_EPOCHS else ""
            result["command"] = f"python bench/bench_int8_goals.py --cases {name} --epochs {args.epochs}{qat}"
            result["wall_seconds"] = round(time.perf_counter() - start, 1)
            result["compute_seconds"] = _compute_seconds(result["runs"])
            result["machine"] = {
                "cpu_flags": _cpu_flags(),
                "processor": platform.processor() or platform.machine(),
            }
            payload["cases"][name] = result
            args.out.write_text(json.dumps(payload, indent=1) + "\n")  # after each case: partial results kept
            print(f"wrote {args.out} ({name})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
