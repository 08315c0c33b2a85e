"""The project's dense training against a plain PyTorch script, on the same settings and images.

Why this exists: at equal settings the project's dense Fashion-MNIST model trained worse than
the 60-line anchor script ``fmnist_plain_tp.py`` (torch-pruning + PGD-AT, kept outside the repo
with the team's shared anchors). This runs both sides on the same images (the first
``--train-samples`` training and the first 2,000 test images), the same network (the script's
five-conv network, here a user factory, :func:`anchor_net`), the same optimiser (SGD, Nesterov
momentum 0.9, weight decay 5e-4, batch 128, one-cycle peak lr 0.05), the same PGD-5 training
attack (eps 0.1, step 0.025, random start, crafted in eval mode) and the same evaluation (clean
and PGD-20 at eps 0.1, step eps/8)::

    flock /tmp/cpu.lock python bench/dense_gap.py --side anchor --anchor ../shared/anchors/fmnist_plain_tp.py
    flock /tmp/cpu.lock python bench/dense_gap.py --side project
    flock /tmp/cpu.lock python bench/dense_gap.py --side project --no-cycle-momentum

``--side anchor`` runs the script itself (a subprocess, stopped once it has printed its dense
model's numbers); ``--side project`` trains through :func:`toolchain.training.train_model`.
``--no-cycle-momentum`` is the project as it was before ``train.cycle_momentum`` (fixed
momentum under ``onecycle``, where torch's ``OneCycleLR`` cycles it). Each call adds its row
to ``--out`` (default bench/results/dense_gap.json), replacing a row with the same settings.
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
# This checkout's toolchain (not an installed one), and bench/ for the user factory below,
# which the model spec names as dense_gap:anchor_net.
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from toolchain.data.base import ImageTensorDataset, make_bundle  # noqa: E402
from toolchain.data.fashion_mnist import CLASS_NAMES, DEFAULT_ROOT, read_idx  # noqa: E402
from toolchain.models.factory import build_model  # noqa: E402
from toolchain.recipe import TrainConfig  # noqa: E402
from toolchain.robustness.attacks.base import eval_mode  # noqa: E402
from toolchain.robustness.attacks.pgd import pgd_attack  # noqa: E402
from toolchain.training import TrainHooks, train_model  # noqa: E402
from toolchain.training.checkpoint import TrainCheckpoint  # noqa: E402
from toolchain.training.loops import make_loader  # noqa: E402

EPS, STEP, TEST_IMAGES = 0.1, 0.025, 2000


def anchor_net(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """The anchor's network: conv-BN-ReLU at 32, 32, pool, 64, 64, pool, 128, global pool, linear."""
    layers: list[nn.Module] = []
    widths = (32, 32, "pool", 64, 64, "pool", 128)
    cin = in_channels
    for w in widths:
        if w == "pool":
            layers.append(nn.MaxPool2d(2))
            continue
        assert isinstance(w, int)
        layers += [nn.Conv2d(cin, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
        cin = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))


def _first_images(split: str, count: int) -> ImageTensorDataset:
    images_file, labels_file = {
        "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
        "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    }[split]
    root = Path(DEFAULT_ROOT)
    images = torch.from_numpy(read_idx(root / images_file, 2051)[:count].copy()).unsqueeze(1)
    labels = torch.from_numpy(read_idx(root / labels_file, 2049)[:count].astype("int64"))
    return ImageTensorDataset(images, labels)


def unprojected_start_pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    step_size: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """L-inf PGD whose perturbation is kept inside the eps-ball but not inside the pixel range:
    the image is clamped to [0, 1] only where it enters the model. A pixel whose random start
    fell outside [0, 1] (half of Fashion-MNIST's black background) then gets no gradient and
    never moves, so this attack is weaker than :func:`pgd_attack`, which keeps ``x + delta``
    in [0, 1] after every step. The plain anchor script's attack behaves this way; the bench
    uses it to tell its effect apart (``--train-attack unprojected`` and ``pgd20_unprojected``)."""
    with eval_mode(model):
        delta = (torch.rand(x.shape, generator=generator) * 2 - 1) * EPS
        for _ in range(steps):
            delta.requires_grad_(True)
            loss = F.cross_entropy(model((x + delta).clamp(0, 1)), y)
            (grad,) = torch.autograd.grad(loss, delta)
            delta = (delta.detach() + step_size * grad.sign()).clamp(-EPS, EPS)
        return (x + delta).clamp(0, 1).detach()


def evaluate(model: nn.Module, data: ImageTensorDataset) -> dict[str, float]:
    """Clean and PGD-20 (eps 0.1, step eps/8, random start) accuracy, as the anchor measures:
    with the project's PGD, and with the unprojected-start PGD (:func:`unprojected_start_pgd`)."""
    model.eval()
    x, y = data.images.float() / 255, data.labels
    hits = {"clean": 0, "pgd20": 0, "pgd20_unprojected": 0}
    for i in range(0, len(x), 500):
        xb, yb = x[i : i + 500], y[i : i + 500]
        adv = pgd_attack(
            model, xb, yb, eps=EPS, step_size=EPS / 8, steps=20, generator=torch.Generator().manual_seed(i)
        )
        weak = unprojected_start_pgd(
            model, xb, yb, steps=20, step_size=EPS / 8, generator=torch.Generator().manual_seed(i)
        )
        with torch.no_grad():
            hits["clean"] += int((model(xb).argmax(1) == yb).sum())
            hits["pgd20"] += int((model(adv).argmax(1) == yb).sum())
            hits["pgd20_unprojected"] += int((model(weak).argmax(1) == yb).sum())
    return {k: v / len(x) for k, v in hits.items()}


def run_project(
    train_samples: int, epochs: int, seed: int, cycle_momentum: bool, train_attack: str, work: Path
) -> dict[str, Any]:
    """Train the anchor network through the project's loop on the first images, then evaluate."""
    torch.set_num_threads(2)  # as the anchor script
    bundle = make_bundle(
        "fashion-mnist", _first_images("train", train_samples), _first_images("test", 1), CLASS_NAMES
    )
    torch.manual_seed(seed)
    model = build_model(
        "dense_gap:anchor_net", num_classes=10, in_channels=1, mean=bundle.mean, std=bundle.std, image_size=28
    )
    cfg = TrainConfig(
        epochs=epochs, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4, loss="pgd",
        schedule="onecycle", cycle_momentum=cycle_momentum,
        attack={"eps": EPS, "step_size": STEP, "steps": 5},
    )  # fmt: skip
    # Resumable: a call stopped by its time limit keeps its finished epochs (and the trained
    # model), and the same call again goes on from there.
    name = f"project-n{train_samples}-e{epochs}-s{seed}-cycle{int(cycle_momentum)}"
    name += "-unprojected" if train_attack == "unprojected" else ""
    hooks = TrainHooks()
    if train_attack == "unprojected":
        rng = torch.Generator().manual_seed(seed)
        hooks.perturb = lambda m, x, y: unprojected_start_pgd(m, x, y, steps=5, step_size=STEP, generator=rng)
    trained = work / f"{name}.pt"
    started = time.perf_counter()
    if trained.is_file():
        model.load_state_dict(torch.load(trained, weights_only=True))
        seconds = json.loads(trained.with_suffix(".json").read_text())["train_s"]
    else:
        checkpoint = TrainCheckpoint(work / f"{name}.ckpt", key=name)
        loader = make_loader(bundle.train, 128, shuffle=True, seed=seed)
        history = train_model(
            model, loader, cfg, seed=seed, progress=False, checkpoint=checkpoint, hooks=hooks
        )
        seconds = round(time.perf_counter() - started)  # this call's share when it resumed
        torch.save(model.state_dict(), trained)
        trained.with_suffix(".json").write_text(json.dumps({"train_s": seconds, "last_epoch": history[-1]}))
    return {**evaluate(model, _first_images("test", TEST_IMAGES)), "train_s": seconds}


def run_anchor(script: Path, train_samples: int, epochs: int) -> dict[str, Any]:
    """Run the anchor script and stop it once it has printed its dense model's numbers (it goes
    on to prune, which this comparison does not need)."""
    with tempfile.TemporaryDirectory() as cwd:  # the script writes its JSON into its cwd
        proc = subprocess.Popen(
            [sys.executable, str(script.resolve()), str(train_samples), str(epochs)],
            cwd=cwd,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                if line.startswith("{'dense'"):
                    dense = ast.literal_eval(line)["dense"]
                    return {
                        "clean": dense["clean"],
                        "pgd20": dense["pgd20"],
                        "train_s": round(dense["train_s"]),
                    }
        finally:
            proc.terminate()
            proc.wait()
    raise RuntimeError(f"{script} ended without printing its dense model's numbers")


def _settings(row: dict[str, Any]) -> tuple[Any, ...]:
    """What makes two rows the same run (rows written before --train-attack trained with the project's)."""
    attack = row.get("train_attack", "project") if row["side"] == "project" else None
    return (row["train_samples"], row["epochs"], row["side"], row.get("cycle_momentum"), attack, row["seed"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--side", choices=("anchor", "project"), required=True)
    parser.add_argument("--anchor", type=Path, default=REPO.parent / "shared/anchors/fmnist_plain_tp.py")
    parser.add_argument("--train-samples", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="project side only (the anchor fixes seed 0)")
    parser.add_argument("--no-cycle-momentum", dest="cycle_momentum", action="store_false")
    parser.add_argument(
        "--train-attack",
        choices=("project", "unprojected"),
        default="project",
        help="project side: the project's PGD, or the unprojected-start PGD the plain script uses",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/dense_gap.json")
    parser.add_argument(
        "--work", type=Path, default=Path("/tmp/dense-gap"), help="checkpoints, trained models"
    )
    args = parser.parse_args()
    if args.side == "anchor":
        row = {"side": "anchor", **run_anchor(args.anchor, args.train_samples, args.epochs)}
        row["seed"] = 0
    else:
        args.work.mkdir(parents=True, exist_ok=True)
        result = run_project(
            args.train_samples, args.epochs, args.seed, args.cycle_momentum, args.train_attack, args.work
        )
        row = {
            "side": "project", "cycle_momentum": args.cycle_momentum, "train_attack": args.train_attack,
            "seed": args.seed, **result,
        }  # fmt: skip
    row = {"train_samples": args.train_samples, "epochs": args.epochs, **row}
    print(json.dumps(row))
    rows = json.loads(args.out.read_text())["runs"] if args.out.is_file() else []
    rows = [r for r in rows if _settings(r) != _settings(row)] + [row]
    payload = {
        "benchmark": "dense_gap",
        "dataset": "fashion-mnist",
        "images": f"the first train_samples training images; the first {TEST_IMAGES} test images",
        "model": "the anchor's 5-conv network (bench/dense_gap.py:anchor_net, a user factory)",
        "train": "SGD Nesterov momentum 0.9, weight decay 5e-4, batch 128, one-cycle peak lr 0.05, "
        f"PGD-5 eps {EPS} step {STEP} from a random start, crafted in eval mode",
        "evaluation": f"clean and PGD-20 (eps {EPS}, step eps/8, random start) on the test images: pgd20 "
        "with the project's PGD, pgd20_unprojected with bench/dense_gap.py:unprojected_start_pgd (the "
        "anchor's own pgd20 is measured by its own attack)",
        "runs": sorted(rows, key=lambda r: tuple(map(str, _settings(r)))),
    }
    args.out.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
