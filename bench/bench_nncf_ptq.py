"""NNCF's ONNX post-training quantisation beside ONNX Runtime's, on one run's FP32 file.

    python bench/bench_nncf_ptq.py --run RUN_DIR --recipe RECIPE [--set KEY=VALUE ...]
                                   [--out bench/results/int8_nncf.json]

NNCF called directly, with each of its presets (the quantize stage's ``nncf`` method uses
``mixed``). On the finished run's
pruned FP32 ONNX file, each quantiser writes a static INT8 Q/DQ file from the same calibration
images (the first ``quantize.samples`` training images the quantize stage draws): ONNX Runtime's
``quantize_static`` through ``calibration/qdq.py`` (u8s8, per-channel weights) with ``minmax``
and with the method the run's ``auto`` chose, and ``nncf.quantize`` with its ``performance``
preset (symmetric activations) and its ``mixed`` preset (asymmetric activations), both with its
default fast bias correction, on the same BatchNorm-folded graph ONNX Runtime's pre-processing
gives. Each file is measured on the run's validation images as ``bench/bench_int8.py`` measures:
top-1 agreement with the FP32 file on clean and PGD-transfer images (PGD crafted on the PyTorch
model), accuracies, the convolutions ONNX Runtime runs as integer kernels and the speed ratio
(FP32 p50 / INT8 p50, interleaved) at batch 1 and 32. One run.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from bench_int8 import _cpu_flags, _scores, fp32_baseline  # noqa: E402

from calibration.data import take_images  # noqa: E402
from calibration.fusion import count_fused_kernels  # noqa: E402
from calibration.qdq import quantize_onnx  # noqa: E402
from calibration.speed import int8_speed  # noqa: E402
from toolchain.recipe import load_recipe  # noqa: E402
from toolchain.training.loops import make_loader  # noqa: E402


def _nncf_file(pre: Path, dst: Path, images: np.ndarray, preset: str) -> float:
    """Write NNCF's Q/DQ file of the pre-processed graph ``pre``; returns the seconds it took."""
    import nncf  # optional: this benchmark only

    model = onnx.load(str(pre))
    name = model.graph.input[0].name
    feeds = [{name: images[i : i + 32]} for i in range(0, len(images), 32)]
    start = time.perf_counter()
    quantized = nncf.quantize(
        model,
        nncf.Dataset(feeds),
        preset=getattr(nncf.QuantizationPreset, preset.upper()),
        subset_size=len(images),
    )
    seconds = time.perf_counter() - start
    onnx.save(quantized, str(dst))
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished run directory")
    parser.add_argument("--recipe", type=Path, required=True, help="the recipe the run was made with")
    parser.add_argument("--set", action="append", default=[], help="the run's recipe overrides")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "int8_nncf.json")
    args = parser.parse_args()
    import nncf
    from onnxruntime.quantization import quant_pre_process

    torch.manual_seed(0)
    torch.set_num_threads(1)
    start = time.perf_counter()
    recipe = load_recipe(args.recipe, args.set)
    baseline = fp32_baseline(recipe, args.run)
    data, images = baseline["data"], baseline["images"]
    fp32_file, fp32, reference = baseline["file"], baseline["scores"], baseline["reference"]
    loader = functools.partial(
        make_loader,
        data.train,
        recipe.data.batch_size,
        shuffle=True,
        seed=recipe.seed + 3,
        collate_fn=data.collate,
    )
    pixels = take_images(loader(), recipe.quantize.samples)[0].numpy()
    report = json.loads((args.run / "report.json").read_text())
    auto = next(q["method"] for q in report["quantization"] if q["calibration"] == "clean")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_file), str(pre), skip_symbolic_shape=False)
        files: dict[str, tuple[Path, float]] = {}
        for method in dict.fromkeys(["minmax", auto]):
            began = time.perf_counter()
            result = quantize_onnx(fp32_file, Path(tmp) / f"ort-{method}.onnx", pixels, method=method)
            files[f"onnxruntime quantize_static, {method}"] = (result.path, time.perf_counter() - began)
        for preset in ("performance", "mixed"):
            path = Path(tmp) / f"nncf-{preset}.onnx"
            files[f"nncf, {preset} preset"] = (path, _nncf_file(pre, path, pixels, preset))
        for label, (path, seconds) in files.items():
            scores = {k: v for k, v in _scores(path, images, reference).items() if not k.startswith("_")}
            fusion = count_fused_kernels(path)
            speed = int8_speed(
                fp32_file,
                path,
                fusion,
                batches=[1, 32],
                threads=recipe.bench.threads,
                iterations=recipe.bench.iterations,
            )
            rows.append(
                {
                    "quantiser": label,
                    **scores,
                    "clean_drop": fp32["clean_accuracy"] - scores["clean_accuracy"],
                    "pgd_drop": fp32["adversarial_accuracy"] - scores["adversarial_accuracy"],
                    "write_seconds": round(seconds, 2),
                    "fusion": {k: v for k, v in fusion.items() if k != "optimized_ops"},
                    "speedup": {b: r["speedup"] for b, r in speed["batches"].items()},
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    payload = {
        "benchmark": "int8_nncf",
        "command": "python bench/bench_nncf_ptq.py --run RUN_DIR --recipe "
        + " ".join([str(args.recipe), *(f"--set '{item}'" for item in args.set)]),
        "run": {"name": recipe.name, "arch": recipe.model.arch, "macs": report["models"]["pruned"]},
        "nncf": nncf.__version__,
        "calibration_images": len(pixels),
        "validation_images": len(images["labels"]),
        "fp32": fp32,
        "rows": rows,
        "machine": {"cpu_flags": _cpu_flags()},
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
