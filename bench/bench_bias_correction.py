"""Does bias correction help? Post-training INT8 files with and without it, on a model trained here.

    python bench/bench_bias_correction.py [--epochs 4] [--out JSON]

(the results: ``--epochs 4`` and ``--epochs 8``, into ``bench/results/int8_bias_correction_e{4,8}.json``)

Trains the quickstart's model (ResNet-20 at width 0.5 on the built-in ``signs`` images, 32 px,
single-step PGD training as the quickstart does, for ``--epochs``; not pruned), exports it, calibrates on 256
training images, then writes one ``u8s8`` file per calibration method, with and without
``quantize.bias_correction``, through the quantize stage's own code (:class:`Calibration.write`).
Measured on 500 validation images (none used for calibration): top-1 agreement with the FP32
file on clean and PGD-transfer images (PGD crafted on the PyTorch model), mean |logit
difference|, and each bias-corrected layer's remaining mean output shift against FP32 (mean
over layers and channels of |INT8 mean - FP32 mean|, as ONNX Runtime runs the file), and the
seconds each file took to write (one thread; the first corrected file also measures the FP32
means every later one reuses). One run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from calibration.bias import biased_layers, layer_means  # noqa: E402
from calibration.qdq import calibrate  # noqa: E402
from calibration.ranges import range_methods  # noqa: E402
from exporters.base import InputSpec  # noqa: E402
from exporters.onnx import export_onnx  # noqa: E402
from toolchain.data import load_data  # noqa: E402
from toolchain.models.factory import build_model  # noqa: E402
from toolchain.recipe import AttackConfig, TrainConfig  # noqa: E402
from toolchain.robustness.attacks.pgd import pgd_examples  # noqa: E402
from toolchain.training.loops import make_loader, train_model  # noqa: E402

EPS = 4 / 255


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i : i + 100]})[0] for i in range(0, len(x), 100)])


def _residual_shift(path: Path, fp32: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> float:
    """Mean over layers and channels of |INT8 mean - FP32 mean| of each biased layer's output,
    each layer measured alone (the layers upstream in ONNX Runtime's integer kernels)."""
    quantised = onnx.load(str(path))
    nodes = {n.name: n for n in quantised.graph.node}
    layers = [layer for layer in biased_layers(fp32) if layer.node in nodes]
    reference = layer_means(fp32, {layer.output: layer.axis for layer in layers}, feeds, optimize=False)
    gaps = []
    for layer in layers:
        out = nodes[layer.node].output[0]
        got = layer_means(quantised, {out: layer.axis}, feeds)[out]
        gaps.append(float(np.abs(got - reference[layer.output]).mean()))
    return float(np.mean(gaps))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--out", type=Path, help="default: bench/results/int8_bias_correction_e{EPOCHS}.json")
    args = parser.parse_args()
    out = args.out or REPO / "bench" / "results" / f"int8_bias_correction_e{args.epochs}.json"
    torch.manual_seed(0)
    torch.set_num_threads(1)
    start = time.perf_counter()
    data = load_data("signs", image_size=32, train_samples=4000, val_samples=500, seed=0)
    model = build_model(
        "resnet20",
        num_classes=len(data.class_names),
        in_channels=data.channels,
        mean=data.mean,
        std=data.std,
        width=0.5,
    )
    attack = AttackConfig(eps=EPS, step_size=5 / 255, steps=1)
    cfg = TrainConfig(epochs=args.epochs, lr=0.1, loss="pgd", warmup_epochs=1, attack=attack)
    loader = make_loader(data.train, 64, shuffle=True, seed=0, collate_fn=data.collate)
    history = train_model(model, loader, cfg, seed=0, progress=False)
    model.eval()
    train_x = torch.stack([data.train[i][0] for i in range(256)]).numpy()
    val_x = torch.stack([data.val[i][0] for i in range(len(data.val))])
    val_y = torch.tensor([int(data.val[i][1]) for i in range(len(data.val))])
    generator = torch.Generator().manual_seed(1)
    pgd = AttackConfig(eps=EPS, step_size=1 / 255, steps=10)
    adv_x = torch.cat(
        [pgd_examples(model, x, y, pgd, generator) for x, y in zip(val_x.split(100), val_y.split(100))]
    )
    images = {"clean": val_x.numpy(), "adversarial": adv_x.detach().numpy()}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        fp32_file = export_onnx(model, Path(tmp) / "fp32.onnx", input_spec=InputSpec(data.channels, 32, 32))
        fp32_logits = {kind: _run(fp32_file, x) for kind, x in images.items()}
        prepared = calibrate(fp32_file, train_x)
        val_feeds = [{"pixels": images["clean"][i : i + 100]} for i in range(0, len(val_x), 100)]
        for method in range_methods():
            for corrected in (False, True):
                began = time.perf_counter()
                written = prepared.write(
                    Path(tmp) / f"{method}-{corrected}.onnx", method=method, bias_correction=corrected
                )
                row: dict[str, Any] = {
                    "method": method,
                    "bias_correction": corrected,
                    "write_seconds": round(time.perf_counter() - began, 2),
                }
                for kind, x in images.items():
                    logits = _run(written.path, x)
                    row[f"{kind}_agreement"] = float(np.mean(logits.argmax(1) == fp32_logits[kind].argmax(1)))
                    row[f"{kind}_accuracy"] = float(np.mean(logits.argmax(1) == val_y.numpy()))
                    row[f"{kind}_mean_abs_logit_error"] = float(np.abs(logits - fp32_logits[kind]).mean())
                row["mean_output_shift"] = _residual_shift(written.path, prepared.model, val_feeds)
                rows.append(row)
                print(json.dumps(row), flush=True)
        fp32 = {f"{k}_accuracy": float(np.mean(v.argmax(1) == val_y.numpy())) for k, v in fp32_logits.items()}
    result = {
        "benchmark": "int8_bias_correction",
        "command": f"python bench/bench_bias_correction.py --epochs {args.epochs}",
        "model": "resnet20 width 0.5, signs 32 px, 4000 training images, 1-step PGD training",
        "train_history": history,
        "calibration_images": len(train_x),
        "validation_images": len(val_x),
        "fp32": fp32,
        "rows": rows,
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
