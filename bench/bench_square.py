"""Time the Square attack against an ONNX Runtime session, and write JSON.

    python bench/bench_square.py [--images 200] [--queries 1000] [--eps 8/255]
                                 [--threads 2] [--out bench/results/square.json]

(after ``pip install -e .``, or with ``PYTHONPATH=.`` from the repository root).

The model is a small CNN defined here (two conv blocks, ~6k parameters, 3x32x32 input, 4
classes), *trained* for a few seconds on a synthetic task (a brighter square in the quadrant
of the class, contrast varying per image, on uniform noise), so that clean accuracy is near
100% and Square has correct samples to attack and must spend queries on the robust ones.
It is exported with the TorchScript exporter (``dynamo=False``) and run by an
``onnxruntime.InferenceSession`` (``intra_op_num_threads=--threads``) through a minimal local
Runner. The JSON holds wall time, total queries, queries per second, the share of time spent
inside ONNX Runtime, accuracies before and after, and the library versions. With
``--compare-torch`` the same attack (same seed) also runs on the PyTorch model, and the JSON
says whether the adversarial batches are identical.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from exporters.base import InputSpec, Runner
from toolchain.robustness.attacks import Square, parse_eps, robust_accuracy

REPO = Path(__file__).resolve().parents[1]
SIZE, CLASSES = 32, 4


class OrtRunner(Runner):
    """ONNX Runtime session as a Runner; records the time spent inside ``session.run``."""

    runtime = "onnxruntime"

    def __init__(self, path: Path, threads: int) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.calls, self.rows, self.seconds = 0, 0, 0.0
        super().__init__(input_spec=InputSpec(3, SIZE, SIZE))

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        (logits,) = self.session.run(None, {"pixels": np.ascontiguousarray(x.numpy(), dtype=np.float32)})
        self.seconds += time.perf_counter() - start
        self.calls, self.rows = self.calls + 1, self.rows + len(x)
        return torch.from_numpy(logits)


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % CLASSES
    x = 0.3 + 0.3 * torch.rand(n, 3, SIZE, SIZE, generator=g)
    contrast = 0.04 + 0.16 * torch.rand(n, generator=g)
    half, side = SIZE // 2, SIZE // 2 - 4
    for i, label in enumerate(y.tolist()):
        top, left = half * (label // 2) + 2, half * (label % 2) + 2
        x[i, :, top : top + side, left : left + side] += contrast[i]
    return x.clamp(0, 1), y


def train_cnn(seconds: float = 5.0) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(32 * 16, CLASSES),
    )
    x, y = make_data(2048, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for xb, yb in zip(x.split(64), y.split(64)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    return model.eval()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--eps", default="8/255")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare-torch", action="store_true")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "square.json"))
    args = parser.parse_args()

    torch.set_num_threads(1)  # the attack's own bookkeeping; ONNX Runtime has its own threads
    model = train_cnn()
    x, y = make_data(args.images, seed=2)
    attack = Square(eps=parse_eps(args.eps), queries=args.queries, seed=args.seed)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cnn.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model,
                (x[:1],),
                str(path),
                input_names=["pixels"],
                output_names=["logits"],
                dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}},
                dynamo=False,
            )
        runner = OrtRunner(path, args.threads)
        clean = robust_accuracy(runner, x, y)
        runner.calls, runner.rows, runner.seconds = 0, 0, 0.0
        start = time.perf_counter()
        result = attack(runner, x, y)
        wall = time.perf_counter() - start
        adversarial = robust_accuracy(runner, result.x_adv, y)

    assert result.queries is not None  # Square is black-box: it always counts
    total = int(result.queries.sum())
    out: dict[str, object] = {
        "attack": {"name": "square", "norm": "linf", "eps": attack.eps, "queries_budget": args.queries},
        "images": args.images,
        "model": "small CNN (2 conv blocks), trained ~5 s on the synthetic quadrant task",
        "runtime": {"name": "onnxruntime", "intra_op_threads": args.threads, "provider": "CPU"},
        "wall_seconds": round(wall, 3),
        "total_queries": total,
        "queries_per_second": round(total / wall, 1),
        "mean_queries_per_image": round(total / args.images, 2),
        "runner_calls": runner.calls,
        "runner_rows": runner.rows,
        "share_of_time_in_onnxruntime": round(runner.seconds / wall, 3),
        "accuracy_before": clean,
        "accuracy_after": adversarial,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "onnxruntime": ort.__version__,
            "numpy": np.__version__,
        },
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    if args.compare_torch:
        start = time.perf_counter()
        on_torch = attack(model, x, y)
        out["torch"] = {
            "wall_seconds": round(time.perf_counter() - start, 3),
            "accuracy_after": robust_accuracy(model, on_torch.x_adv, y),
            "identical_to_onnxruntime": bool(torch.equal(on_torch.x_adv, result.x_adv)),
        }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
