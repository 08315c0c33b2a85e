"""INT8 against its FP32 file, by how the file was made, on a finished run's pruned model.

    python bench/bench_int8.py --run RUN_DIR --recipe RECIPE [--name NAME] [--out JSON]

For each configuration (``minmax``: the former default, every layer INT8; ``auto``: the method
chosen on held-out training images; ``auto+mixed``: that, with the most sensitive layers kept in
FP32 until held-out agreement reaches 0.99 clean / 0.97 PGD-transfer) and each calibration set,
the quantize stage's own code writes the file, then this script measures on the recipe's
validation split what the INT8 gate judges: top-1 agreement with the FP32 file on clean and
PGD-transfer images (PGD crafted on the PyTorch model, as validation does), the clean and
PGD-transfer accuracy drops, and the speed ratio (FP32 p50 / INT8 p50 on ONNX Runtime's CPU) at
batch 1 and 32. Choices are made on training images; the numbers reported are on validation
images. One run; the JSON records the machine's CPU flags (INT8 speed depends on them).
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from calibration.select import predict_labels  # noqa: E402
from toolchain.data import load_data  # noqa: E402
from toolchain.models.factory import trusted_builder  # noqa: E402
from toolchain.pruning.io import load_pruned  # noqa: E402
from toolchain.recipe import load_recipe  # noqa: E402
from toolchain.robustness.suite import parity_craft  # noqa: E402
from toolchain.rundir import RunLayout  # noqa: E402
from toolchain.stages.quantize import quantize_models  # noqa: E402
from toolchain.training.loops import make_loader  # noqa: E402

CONFIGS: dict[str, list[str]] = {
    "minmax": ["quantize.method=minmax"],
    "auto": ["quantize.method=auto"],
    "auto+mixed": [
        "quantize.method=auto",
        "quantize.target_agreement=0.99",
        "quantize.target_adversarial_agreement=0.97",
    ],
}
#: The INT8 gate's default limits (docs/concepts/int8.md).
LIMITS = {"agreement": 0.99, "adversarial_agreement": 0.97, "clean_drop": 0.005, "pgd_drop": 0.01}


def _cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []
    )
    return sorted(f for f in flags if f.startswith(("avx", "fma")) or "vnni" in f)


def _validation(recipe: Any, data: Any, model: torch.nn.Module) -> dict[str, Any]:
    val = [data.val[i] for i in range(min(recipe.validate.samples, len(data.val)))]
    x = torch.stack([v[0] for v in val])
    y = torch.tensor([int(v[1]) for v in val])
    craft = parity_craft(model, recipe.validate)
    assert craft is not None, "the recipe's validate.attacks needs a white-box attack"
    adversarial = torch.cat([craft(xc, yc).detach() for xc, yc in zip(x.split(100), y.split(100))])
    return {"clean": x.numpy(), "adversarial": adversarial.numpy(), "labels": y.numpy()}


def _scores(path: Path, images: dict[str, Any], reference: dict[str, np.ndarray] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in ("clean", "adversarial"):
        labels = predict_labels(path, images[kind], threads=1)
        out[f"{kind}_accuracy"] = float(np.mean(labels == images["labels"]))
        if reference is not None:
            out[f"{kind}_agreement"] = float(np.mean(labels == reference[kind]))
        out[f"_{kind}_labels"] = labels
    return out


def fp32_baseline(recipe: Any, run: Path) -> dict[str, Any]:
    """What every INT8 comparison on a finished run starts from: the recipe's data, the run's
    pruned model, the validation images (clean and PGD-transfer), the FP32 ONNX file, its scores
    and its labels (the reference each INT8 file's agreement is measured against)."""
    d = recipe.data
    data = load_data(
        d.dataset,
        root=d.root,
        image_size=d.image_size,
        train_samples=d.train_samples,
        val_samples=d.val_samples,
        seed=recipe.data_seed,
    )
    example = torch.zeros(1, data.channels, *data.input_hw)
    model, _ = load_pruned(run / "finetune" / "model.pt", trusted_builder(recipe), example)
    model.eval()
    images = _validation(recipe, data, model)
    fp32_file = RunLayout(run).onnx("pruned")
    fp32 = _scores(fp32_file, images, None)
    reference = {k: fp32.pop(f"_{k}_labels") for k in ("clean", "adversarial")}
    return {
        "data": data,
        "model": model,
        "images": images,
        "file": fp32_file,
        "scores": fp32,
        "reference": reference,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished run directory (its pruned model)")
    parser.add_argument("--recipe", type=Path, required=True, help="the recipe the run was made with")
    parser.add_argument("--name", default="quickstart")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "int8_quickstart.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    start = time.perf_counter()
    base = load_recipe(args.recipe, ["quantize.enabled=true", "bench.batch_sizes=[1, 32]"])
    baseline = fp32_baseline(base, args.run)
    data, model, images = baseline["data"], baseline["model"], baseline["images"]
    fp32_file, fp32, reference = baseline["file"], baseline["scores"], baseline["reference"]
    rows = []
    for config, overrides in CONFIGS.items():
        recipe = load_recipe(args.recipe, ["quantize.enabled=true", "bench.batch_sizes=[1, 32]", *overrides])
        with tempfile.TemporaryDirectory() as tmp:
            layout = RunLayout(tmp)
            layout.onnx("pruned").parent.mkdir(parents=True)
            shutil.copy(fp32_file, layout.onnx("pruned"))
            records = quantize_models(
                recipe,
                {"pruned": model},
                layout,
                functools.partial(
                    make_loader,
                    data.train,
                    base.data.batch_size,
                    shuffle=True,
                    seed=recipe.seed + 3,
                    collate_fn=data.collate,
                ),
            )
            for record in records:
                scores = _scores(layout.quantized(record.file), images, reference)
                scores = {k: v for k, v in scores.items() if not k.startswith("_")}
                drops = {
                    "clean_drop": fp32["clean_accuracy"] - scores["clean_accuracy"],
                    "pgd_drop": fp32["adversarial_accuracy"] - scores["adversarial_accuracy"],
                }
                passes = (
                    scores["clean_agreement"] >= LIMITS["agreement"]
                    and scores["adversarial_agreement"] >= LIMITS["adversarial_agreement"]
                    and drops["clean_drop"] <= LIMITS["clean_drop"]
                    and drops["pgd_drop"] <= LIMITS["pgd_drop"]
                )
                speed = record.speed or {}
                rows.append(
                    {
                        "config": config,
                        "calibration": record.calibration,
                        "method": record.method,
                        "fp32_layers": (record.mixed_precision or {}).get("fp32_nodes", []),
                        "target_met_on_holdout": (record.mixed_precision or {}).get("met"),
                        "methods_fp32_layers": (record.mixed_precision or {}).get("methods_fp32_layers"),
                        "holdout_agreement": record.holdout_agreement,
                        "methods_agreement": record.methods_agreement,
                        **scores,
                        **drops,
                        "passes_default_gate_without_speed": passes,
                        "speedup": {b: r["speedup"] for b, r in speed.get("batches", {}).items()},
                        "faster": speed.get("faster"),
                        "why_not": speed.get("why_not"),
                        "fusion": {k: v for k, v in record.fusion.items() if k != "optimized_ops"},
                    }
                )
                print(json.dumps(rows[-1], default=str)[:600], flush=True)
    result = {
        "benchmark": "int8",
        "name": args.name,
        "recipe": str(args.recipe),
        "command": f"python bench/bench_int8.py --run RUN_DIR --recipe {args.recipe} --name {args.name}",
        "validation_images": len(images["labels"]),
        "fp32": fp32,
        "limits": LIMITS,
        "rows": rows,
        "machine": {"cpu_flags": _cpu_flags(), "processor": platform.processor() or platform.machine()},
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
