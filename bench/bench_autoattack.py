"""Our ``autoattack-lite`` against the reference AutoAttack code, on the same images.

    flock /tmp/cpu.lock python bench/bench_autoattack.py [--images 500] [--eps 0.1]
        [--train-images 20000] [--epochs 6] [--with-fab-t] [--out bench/results/autoattack.json]

(needs ``pip install -e ".[autoattack]"`` and Fashion-MNIST under /usr/share/datasets, the
Debian package ``dataset-fashion-mnist``).

It adversarially trains the zoo's small ``convnet`` (70k parameters) on Fashion-MNIST
(28x28 grayscale, 10 classes) with single-step PGD-AT at L-inf eps 0.1 (random start, step
1.25 eps), then evaluates the first ``--images`` test images with:

* ours: ``autoattack-lite`` (APGD-CE 100 iterations, APGD-T 9 targets x 100, Square 5,000
  queries without rescaling the ``p`` schedule), seed 0;
* the reference (``pyautoattack``, the official code) with the same three attacks and its
  standard settings, seed 0;
* with ``--with-fab-t``, the reference's full standard run (adding FAB-T; the slowest part).

It writes clean accuracy, robust accuracy after each attack, the final numbers, how many
images each side alone left robust, and wall times to the JSON file.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import torch

from toolchain.data import load_data
from toolchain.models import build_model
from toolchain.recipe import TrainConfig
from toolchain.robustness.attacks import AutoAttackLite, build_attack, predict
from toolchain.training import make_loader, train_model

REPO = Path(__file__).resolve().parents[1]


def _train(args: argparse.Namespace, data: object) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(
        "convnet",
        num_classes=data.num_classes,  # type: ignore[attr-defined]
        in_channels=data.channels,  # type: ignore[attr-defined]
        mean=data.mean,  # type: ignore[attr-defined]
        std=data.std,  # type: ignore[attr-defined]
        image_size=data.image_size,  # type: ignore[attr-defined]
    )
    cfg = TrainConfig.model_validate(
        {
            "epochs": args.epochs,
            "lr": 0.05,
            "loss": "pgd",
            "warmup_epochs": 1,
            "attack": {"eps": args.eps, "step_size": 1.25 * args.eps, "steps": 1},
        }
    )
    loader = make_loader(data.train, 128, shuffle=True, seed=0)  # type: ignore[attr-defined]
    train_model(model, loader, cfg, seed=0, desc="train", progress=False)
    return model.eval()


def _survivors(model: torch.nn.Module, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return predict(model, x_adv, batch_size=500).argmax(1) == y


def _ours(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> dict[str, object]:
    """Each part on the images still robust, as AutoAttack does; robust accuracy after each."""
    robust = _survivors(model, x, y)
    after, seconds = {}, {}
    for part in AutoAttackLite(eps=eps, seed=0).components():
        idx = robust.nonzero().squeeze(1)
        start = time.perf_counter()
        found = part(model, x[idx], y[idx]).x_adv if len(idx) else x[idx]
        seconds[part.name] = round(time.perf_counter() - start, 1)
        robust[idx] = _survivors(model, found, y[idx])
        after[part.name] = int(robust.sum()) / len(y)
        logging.info("ours, after %s: %.4f (%.0f s)", part.name, after[part.name], seconds[part.name])
    return {"robust": robust, "after": after, "seconds": seconds}


def _reference(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, parts: list[str]
) -> dict[str, object]:
    attack = build_attack("autoattack", eps=eps, seed=0)
    attack.attacks = parts  # type: ignore[attr-defined]
    start = time.perf_counter()
    x_adv = attack(model, x, y).x_adv
    return {"robust": _survivors(model, x_adv, y), "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--train-images", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--with-fab-t", action="store_true", help="also the reference's standard run")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "autoattack.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)

    data = load_data("fashion-mnist", train_samples=args.train_images, seed=0)
    start = time.perf_counter()
    model = _train(args, data)
    train_seconds = time.perf_counter() - start
    x = torch.stack([data.val[i][0] for i in range(args.images)])
    y = torch.tensor([int(data.val[i][1]) for i in range(args.images)])
    clean = _survivors(model, x, y)
    logging.info("trained in %.0f s; clean accuracy %.4f", train_seconds, float(clean.float().mean()))

    ours = _ours(model, x, y, args.eps)
    logging.info("ours: %s", ours["after"])
    lite = _reference(model, x, y, args.eps, ["apgd-ce", "apgd-t", "square"])
    logging.info("reference (same three): %.4f (%s s)", float(lite["robust"].float().mean()), lite["seconds"])  # type: ignore[union-attr]
    mine, theirs = ours["robust"], lite["robust"]
    result = {
        "model": "convnet (zoo), single-step PGD-AT",
        "dataset": "fashion-mnist",
        "train_images": args.train_images,
        "epochs": args.epochs,
        "train_seconds": round(train_seconds, 1),
        "images": args.images,
        "norm": "linf",
        "eps": args.eps,
        "clean_accuracy": int(clean.sum()) / args.images,
        "ours_autoattack_lite": {
            "robust_accuracy": int(mine.sum()) / args.images,  # type: ignore[union-attr]
            "after_each_attack": ours["after"],
            "seconds": ours["seconds"],
        },
        "reference_same_three": {
            "robust_accuracy": int(theirs.sum()) / args.images,  # type: ignore[union-attr]
            "seconds": lite["seconds"],
        },
        "robust_for_ours_only": int((mine & ~theirs).sum()),  # type: ignore[operator]
        "robust_for_reference_only": int((~mine & theirs).sum()),  # type: ignore[operator]
        "difference_points": round(100 * (int(mine.sum()) - int(theirs.sum())) / args.images, 2),  # type: ignore[union-attr]
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    if args.with_fab_t:
        standard = _reference(model, x, y, args.eps, ["apgd-ce", "apgd-t", "fab-t", "square"])
        full = standard["robust"]
        result["reference_standard_with_fab_t"] = {
            "robust_accuracy": int(full.sum()) / args.images,  # type: ignore[union-attr]
            "seconds": standard["seconds"],
        }
        logging.info("reference standard: %.4f", result["reference_standard_with_fab_t"]["robust_accuracy"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
