"""The AER benchmark's dense model at another peak learning rate, on held-out training images.

Why this exists: the AER dense model (Fashion-MNIST, ``convnet``, 20,000 images, 8 one-cycle
Nesterov epochs of PGD-5 training at eps 0.1, peak lr 0.05) was 4 points below a plain script's.
This trains that same model (``bench/aer.py``'s ``base_recipe``: model, attack, batch size) with
one peak learning rate per call and evaluates clean and PGD-20 accuracy on 2,000 images held
out from the *training* split, so the choice is made without looking at the test set::

    for lr in 0.05 0.1 0.2 0.4; do
        OMP_NUM_THREADS=1 flock /tmp/cpu.lock python bench/dense_lr.py --lr $lr
    done

Each call adds its row to ``--out`` (default bench/results/dense-lr-fashion-mnist-holdout.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from aer import base_recipe  # noqa: E402  (bench/ is not a package)

from toolchain.data import load_data  # noqa: E402
from toolchain.models.factory import build_model  # noqa: E402
from toolchain.recipe import TrainConfig  # noqa: E402
from toolchain.robustness.attacks.pgd import pgd_attack  # noqa: E402
from toolchain.training import train_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--lr", type=float, required=True, help="peak learning rate of the one-cycle schedule"
    )
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument(
        "--out", type=Path, default=REPO / "bench/results/dense-lr-fashion-mnist-holdout.json"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    recipe = base_recipe("fashion-mnist", "full")
    data_cfg, train_cfg = recipe["data"], recipe["train"]
    data = load_data("fashion-mnist", train_samples=data_cfg["train_samples"], holdout=2000, seed=0)
    torch.manual_seed(0)
    model = build_model(
        recipe["model"]["arch"], num_classes=data.num_classes, in_channels=data.channels,
        mean=data.mean, std=data.std, image_size=data.image_size,
    )  # fmt: skip
    cfg = TrainConfig(
        epochs=args.epochs, lr=args.lr, loss="pgd", schedule=train_cfg["schedule"],
        nesterov=train_cfg["nesterov"], attack=train_cfg["attack"],
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(
        data.train,
        batch_size=data_cfg["batch_size"],
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    started = time.perf_counter()
    history = train_model(model, loader, cfg, progress=False)
    model.eval()
    x = torch.stack([data.val[i][0] for i in range(len(data.val))])
    y = torch.tensor([int(data.val[i][1]) for i in range(len(data.val))])
    eps = train_cfg["attack"]["eps"]
    clean = robust = 0
    for i in range(0, len(x), 250):
        xb, yb = x[i : i + 250], y[i : i + 250]
        adv = pgd_attack(
            model, xb, yb, eps=eps, step_size=eps / 4, steps=20, generator=torch.Generator().manual_seed(i)
        )
        with torch.no_grad():
            clean += int((model(xb).argmax(1) == yb).sum())
            robust += int((model(adv).argmax(1) == yb).sum())
    row = {
        "lr": args.lr, "epochs": args.epochs, "clean": clean / len(x), "pgd20": robust / len(x),
        "train_seconds": round(time.perf_counter() - started), "last_epoch": history[-1],
    }  # fmt: skip
    print(json.dumps(row))
    rows = json.loads(args.out.read_text())["runs"] if args.out.is_file() else []
    rows = [r for r in rows if (r["lr"], r["epochs"]) != (args.lr, args.epochs)] + [row]
    payload = {
        "benchmark": "dense_lr", "dataset": "fashion-mnist", "model": recipe["model"],
        "train_samples": data_cfg["train_samples"], "holdout": 2000, "attack": train_cfg["attack"],
        "evaluation": f"clean and PGD-20 (eps {eps}, step eps/4) on the holdout",
        "runs": sorted(rows, key=lambda r: (r["epochs"], r["lr"])),
    }  # fmt: skip
    args.out.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
