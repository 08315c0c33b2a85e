"""Benchmark: corruption generation time vs ONNX Runtime inference time for the full suite.

Runs every registered corruption at every severity on N RGB 32x32 images, feeding each
corrupted batch to a small CNN exported to ONNX and run with onnxruntime (CPU, 2 intra-op
threads), and records per corruption how long generating took vs running the model. The
target: generation < 25% of the suite's time.

Self-contained on purpose (its own CNN, onnxruntime used directly): it must not depend on
exporter code that evolves separately.

    python bench/bench_corruptions.py [--images 1000] [--out bench/results/corruptions.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from toolchain.robustness.corruptions import CORRUPTIONS, SEVERITIES, corrupt, list_corruptions

log = logging.getLogger("bench_corruptions")


class SmallCNN(nn.Module):
    """A typical small classifier for 32x32 inputs (~0.3 M params, ~12 M MACs per image)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
            )

        self.features = nn.Sequential(
            block(3, 32), block(32, 32), nn.MaxPool2d(2),
            block(32, 64), nn.MaxPool2d(2),
            block(64, 128), nn.MaxPool2d(2),
            block(128, 128),
        )  # fmt: skip
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes))
        self.register_buffer("mean", torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.25, 0.25, 0.25]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features((x - self.mean) / self.std))  # normalisation inside


def export(model: nn.Module, path: Path) -> None:
    model.eval()
    torch.onnx.export(
        model, (torch.rand(1, 3, 32, 32),), str(path), input_names=["pixels"], output_names=["logits"],
        dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False,
    )  # fmt: skip


def images(n: int, seed: int = 0) -> torch.Tensor:
    """Smooth, structured test images (random gradients + a disc), not white noise."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    a, b, c = (torch.rand(n, 3, 1, 1, generator=g) for _ in range(3))
    base = (a + b * xs + c * ys) / 2.5
    centre = torch.rand(n, 2, 1, 1, generator=g)
    disc = ((xs - centre[:, :1]) ** 2 + (ys - centre[:, 1:]) ** 2) < 0.05
    return torch.where(disc, torch.rand(n, 3, 1, 1, generator=g), base).clamp(0, 1).float()


def run(n_images: int, batch: int, threads: int) -> dict:
    torch.set_num_threads(threads)  # corruption generation gets the same 2 cores as the model
    x = images(n_images)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "cnn.onnx"
        torch.manual_seed(0)
        export(SmallCNN(), onnx_path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # ORT's idle workers busy-spin after each run by default; on 2 cores that steals the
        # CPU from the corruption code that runs next and inflates its time several-fold.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])

    def infer(pixels: torch.Tensor) -> np.ndarray:
        outs = [session.run(None, {"pixels": pixels[i : i + batch].numpy()})[0]
                for i in range(0, len(pixels), batch)]  # fmt: skip
        return np.concatenate(outs)

    infer(x[:batch])  # warm-up: session allocations, thread pool
    for name in list_corruptions():
        corrupt(name, x[:8], 1)  # warm-up: cached operators (zoom, filter matrices)
    per: dict[str, dict] = {}
    gen_total = model_total = 0.0
    wall0 = time.perf_counter()
    for name in list_corruptions():
        row = {"family": CORRUPTIONS.get(name).family, "generate_s": {}, "model_s": {}}
        for sev in SEVERITIES:
            t0 = time.perf_counter()
            corrupted = corrupt(name, x, sev, seed=sev)
            t1 = time.perf_counter()
            infer(corrupted)
            t2 = time.perf_counter()
            row["generate_s"][str(sev)] = round(t1 - t0, 5)
            row["model_s"][str(sev)] = round(t2 - t1, 5)
        row["generate_total_s"] = round(sum(row["generate_s"].values()), 4)
        row["model_total_s"] = round(sum(row["model_s"].values()), 4)
        gen_total += row["generate_total_s"]
        model_total += row["model_total_s"]
        per[name] = row
        log.info("%-18s generate %.3fs  model %.3fs", name, row["generate_total_s"], row["model_total_s"])
    wall = time.perf_counter() - wall0
    return {
        "benchmark": "corruptions",
        "images": n_images,
        "image_shape": [3, 32, 32],
        "batch": batch,
        "corruptions": len(per),
        "severities": list(SEVERITIES),
        "totals": {
            "wall_s": round(wall, 3),
            "generate_s": round(gen_total, 3),
            "model_s": round(model_total, 3),
            "generation_share": round(gen_total / (gen_total + model_total), 4),
            "target_share": 0.25,
        },
        "per_corruption": per,
        "environment": {
            "torch": torch.__version__,
            "onnxruntime": ort.__version__,
            "numpy": np.__version__,
            "threads": threads,
            "ort_intra_op_spinning": False,
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=250, help="inference batch size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/corruptions.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = run(args.images, args.batch, args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    t = result["totals"]
    log.info(
        "wall %.2fs  generate %.2fs  model %.2fs  generation share %.1f%% (target < 25%%)  -> %s",
        t["wall_s"], t["generate_s"], t["model_s"], 100 * t["generation_share"], args.out,
    )  # fmt: skip


if __name__ == "__main__":
    main()
