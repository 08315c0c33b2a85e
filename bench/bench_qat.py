"""Quantisation-aware fine-tuning against post-training quantisation on a finished run.

    python bench/bench_qat.py --run RUN_DIR --recipe RECIPE [--name NAME] [--out JSON]

Each configuration resumes a copy of ``RUN_DIR`` with ``robustprune run`` (training, pruning
and fine-tuning are reused; the quantize stage onwards runs) and INT8 switched on: the
post-training files of the recipe's calibration sets (``clean`` and ``mixed``, method chosen on
held-out training images) and a ``qat`` file fine-tuned under INT8 rounding, with the recipe's
fine-tuning loss or with ``rslad`` (distilled from the FP32 model being quantised). The numbers
are the report's own: each file's ``vs_fp32`` on the validation split (top-1 agreement with the
FP32 file on clean and PGD-transfer images, clean / PGD-transfer / corruption drops, ONNX Runtime
CPU speed ratio) and whether the run's gates (the INT8 gate included) passed. One run each.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from bench_segmentation import _run  # noqa: E402  (one way to run a recipe for a bench)

COMMON = ["quantize.enabled=true", "quantize.method=auto", "bench.batch_sizes=[1, 32]"]
CONFIGS: dict[str, list[str]] = {
    "qat-finetune-loss": ["quantize.qat={epochs: 2}"],
    "qat-rslad": ["quantize.qat={epochs: 2, loss: rslad}"],
}
KEEP = (
    "top1_agreement",
    "top1_agreement_adversarial",
    "clean_drop",
    "attack_drop",
    "corruption_drop",
    "speedup",
)


def _rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for q in report.get("quantization", []):
        if q["target"] != "onnxruntime":
            continue
        rows.append(
            {
                "model": q["model"],
                "calibration": q["calibration"],
                "method": q.get("method"),
                **{k: q["vs_fp32"].get(k) for k in KEEP},
                "qat": {k: v for k, v in (q.get("qat") or {}).items() if k in ("epochs", "loss", "init")},
            }
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished run directory of RECIPE")
    parser.add_argument("--recipe", type=Path, required=True)
    parser.add_argument("--name", default="quickstart")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "int8_qat_quickstart.json")
    args = parser.parse_args()
    start = time.perf_counter()
    results = {}
    for config, overrides in CONFIGS.items():
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / "run"
            shutil.copytree(args.run, copy)
            wall, code = _run(args.recipe, [*COMMON, *overrides], copy)
            report = json.loads((copy / "report.json").read_text())
            results[config] = {
                "overrides": [*COMMON, *overrides],
                "exit_code": code,
                "passed": report["passed"],
                "failed_gates": [g["metric"] for g in report.get("gates", []) if not g["passed"]]
                + [g["name"] for g in report.get("intrinsic_gates", []) if not g["passed"]],
                "quantize_seconds": report["stage_seconds"].get("quantize"),
                "wall_seconds": round(wall, 1),
                "files": _rows(report),
            }
            print(json.dumps(results[config])[:800], flush=True)
    payload = {
        "benchmark": "int8_qat",
        "name": args.name,
        "recipe": str(args.recipe),
        "command": f"python bench/bench_qat.py --run RUN_DIR --recipe {args.recipe} --name {args.name}",
        "configs": results,
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
