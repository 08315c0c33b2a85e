"""Segmentation end to end: the quickstart recipe and torchvision's LR-ASPP at 512x256, and JSON.

    python bench/bench_segmentation.py [--quickstart-run DIR] [--skip-lraspp]
                                       [--out bench/results/segmentation.json]

Each case is one ``robustprune run`` (a fresh run directory, so nothing is resumed) whose
report.json gives: MACs dense and pruned, ONNX Runtime p50 latency dense and pruned at batch 1
(and their ratio), and on ONNX Runtime FP32 for dense and pruned: clean mIoU and pixel
accuracy, mean mIoU over the corruptions, PGD and SegPGD transfer mIoU, relative mCE (on mIoU),
export parity; plus the wall time and each stage's time.

* ``quickstart``: ``deploy_examples/segmentation_quickstart.yaml`` as it is (target: under
  10 minutes on 2 CPU cores). ``--quickstart-run DIR`` reads a completed run of that recipe
  (its recipe hash is checked) instead of running it again; its wall time is then the sum
  of its stage times.
* ``lraspp_512x256``: the same recipe with ``torchvision:lraspp_mobilenet_v3_large`` at
  512x256, shortened so it fits on 2 CPU cores (120 training scenes, 1 clean + 1 adversarial
  epoch from random weights, 1 pruning step, 1 fine-tuning epoch, 40 validation scenes, attacks
  on 10): its mIoU numbers are those of a briefly trained network; its MACs and latency ratios
  are what the benchmark is for.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "deploy_examples" / "segmentation_quickstart.yaml"
LRASPP_OVERRIDES = [
    "name=seg_lraspp_512",
    "model.arch=torchvision:lraspp_mobilenet_v3_large",
    "model.width=1.0",
    "data.image_size=512",
    "data.train_samples=120",
    "data.val_samples=40",
    "data.batch_size=8",
    "train.epochs=2",
    "prune.steps=1",
    "prune.importance_batches=1",
    "prune.finetune_between.epochs=0",
    "finetune.epochs=1",
    "export.parity_samples=40",
    "validate.samples=40",
    "validate.batch_size=10",
    "validate.attacks=[{name: pgd, eps: 4/255, steps: 5, samples: 10},"
    " {name: segpgd, eps: 4/255, steps: 5, samples: 10}]",
    "validate.corruptions={names: [gaussian_noise, fog, low_light], severities: [3]}",
    "bench.iterations=20",
    "gates=[]",
]


def _run(recipe: Path, overrides: list[str], run_dir: Path) -> tuple[float, int]:
    cmd = [sys.executable, "-m", "toolchain", "run", str(recipe), "--out", str(run_dir), "--no-progress"]
    for item in overrides:
        cmd += ["--set", item]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - start
    if proc.returncode not in (0, 1):
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(proc.returncode)
    return wall, proc.returncode


def _summary(report: dict[str, Any], wall: float, exit_code: int | None) -> dict[str, Any]:
    """The headline numbers of one segmentation run's report.json."""
    fp32 = {(r["model"], r["batch"]): r for r in report["latency"] if r["precision"] == "fp32"}
    evs = {
        e["model"]: e
        for e in report["evaluations"]
        if e["runtime"] == "onnxruntime" and e["precision"] == "fp32"
    }

    def scores(ev: dict[str, Any]) -> dict[str, Any]:
        return {
            "clean_miou": ev["miou"],
            "clean_pixel_accuracy": ev["pixel_accuracy"],
            "corruptions_mean_miou": ev["corruptions"].get("mean_miou"),
            "relative_mce": ev["corruptions"].get("relative_mce"),
            **{f"{a['name']}_{a['mode']}_miou": a["miou"] for a in ev["attacks"]},
            "per_class_iou": ev["per_class_iou"],
            "parity": ev["parity"],
        }

    models = report["models"]
    return {
        "wall_seconds": round(wall, 1),
        "exit_code": exit_code,
        "stage_seconds": report["stage_seconds"],
        "macs": {"dense": models["dense"]["macs"], "pruned": models["pruned"]["macs"]},
        "macs_reduction": models["pruned"]["macs_reduction"],
        "params_reduction": models["pruned"]["params_reduction"],
        "onnxruntime_p50_ms_batch_1": {
            "dense": fp32[("dense", 1)]["p50_ms"],
            "pruned": fp32[("pruned", 1)]["p50_ms"],
        },
        "onnxruntime_p50_speedup_batch_1": fp32[("dense", 1)]["p50_ms"] / fp32[("pruned", 1)]["p50_ms"],
        "onnxruntime_fp32": {name: scores(ev) for name, ev in evs.items()},
        "export_parity": report["parity"],
        "gates_passed": report["passed"],
        "intrinsic_gates": report["intrinsic_gates"],
    }


def _quickstart(reuse: str | None, tmp: Path) -> dict[str, Any]:
    if reuse is None:
        wall, code = _run(QUICKSTART, [], tmp / "quickstart")
        report = json.loads((tmp / "quickstart" / "report.json").read_text())
        return {
            "recipe": str(QUICKSTART.relative_to(REPO)),
            "reused_run": None,
            **_summary(report, wall, code),
        }
    sys.path.insert(0, str(REPO))  # the bench runs from a checkout; the package is on this path
    from toolchain.recipe import load_recipe

    report = json.loads((Path(reuse) / "report.json").read_text())
    if report.get("recipe_sha256") != load_recipe(QUICKSTART).sha256() or report.get("status") != "completed":
        raise SystemExit(f"{reuse} is not a completed run of {QUICKSTART.name}; run without --quickstart-run")
    wall = sum(v for v in report["stage_seconds"].values() if v)
    return {"recipe": str(QUICKSTART.relative_to(REPO)), "reused_run": reuse, **_summary(report, wall, None)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quickstart-run", help="a completed run directory of the quickstart recipe")
    parser.add_argument("--skip-lraspp", action="store_true")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "segmentation.json"))
    args = parser.parse_args()
    result: dict[str, Any] = {"benchmark": "segmentation"}
    with tempfile.TemporaryDirectory() as tmp:
        result["quickstart"] = _quickstart(args.quickstart_run, Path(tmp))
        if not args.skip_lraspp:
            wall, code = _run(QUICKSTART, LRASPP_OVERRIDES, Path(tmp) / "lraspp")
            report = json.loads((Path(tmp) / "lraspp" / "report.json").read_text())
            result["lraspp_512x256"] = {"overrides": LRASPP_OVERRIDES, **_summary(report, wall, code)}
            result["environment"] = report["environment"]
    result["machine"] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
