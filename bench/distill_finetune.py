"""Fine-tuning a magnitude-pruned model with PGD-AT against distilling it from its dense model.

One adversarially trained dense model (Fashion-MNIST, ``bench/aer.py``'s recipe at the chosen
setting), pruned once by channel magnitude to ``--budget`` x fewer MACs; then the same pruned
model is fine-tuned with each ``--losses`` entry (``pgd``, ``ard``, ``rslad`` at the recipe's
default ``distill`` settings: adversarial weight 5/6, temperature 1, no corruption term) for
the same epochs, and evaluated on the test split: clean, PGD-20 (eps 0.1, step eps/4) and the
mean accuracy over three corruptions at severity 3. One seed; the settings were not tuned on
these images. Each part runs on its own (heavy jobs stay short)::

    flock /tmp/cpu.lock python bench/distill_finetune.py --part dense
    for loss in pgd ard rslad; do flock /tmp/cpu.lock python bench/distill_finetune.py --part $loss; done

The dense and pruned models are kept under ``--work``; each part adds its row to ``--out``
(default bench/results/distill-finetune-fashion-mnist.json).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from aer import base_recipe  # noqa: E402  (bench/ is not a package)

from toolchain import preflight  # noqa: E402
from toolchain.data import DataBundle  # noqa: E402
from toolchain.models.factory import trusted_builder  # noqa: E402
from toolchain.pruning import load_pruned, prune_model, save_pruned  # noqa: E402
from toolchain.recipe import Recipe, recipe_from_dict  # noqa: E402
from toolchain.robustness.attacks.pgd import pgd_attack  # noqa: E402
from toolchain.robustness.corruptions import corrupt  # noqa: E402
from toolchain.training import train_model  # noqa: E402
from toolchain.training.loops import make_loader  # noqa: E402

CORRUPTIONS = ("gaussian_noise", "motion_blur", "fog")


def recipe(setting: str, budget: float, loss: str = "pgd") -> Recipe:
    """``bench/aer.py``'s Fashion-MNIST recipe with magnitude pruning in one step to ``budget``."""
    raw = base_recipe("fashion-mnist", setting)
    after = 4 if setting == "full" else 2
    raw["prune"] = {
        "method": "iterative",
        "criterion": "magnitude",
        "steps": 1,
        "target": {"macs_reduction": budget},
    }
    raw["finetune"] = {**raw["finetune"], "epochs": after, "loss": loss}
    return recipe_from_dict(raw)


def _loader(r: Recipe, data: DataBundle, offset: int) -> torch.utils.data.DataLoader:
    return make_loader(data.train, r.data.batch_size, shuffle=True, seed=r.seed + offset)


def evaluate(model: nn.Module, data: DataBundle, eps: float) -> dict[str, float]:
    """Clean, PGD-20 and mean corruption accuracy on the test split."""
    model.eval()
    x = torch.stack([data.val[i][0] for i in range(len(data.val))])  # type: ignore[arg-type]
    y = torch.tensor([int(data.val[i][1]) for i in range(len(data.val))])  # type: ignore[arg-type]
    hits = {"clean": 0, "pgd20": 0, "corruptions": 0}
    for i in range(0, len(x), 250):
        xb, yb = x[i : i + 250], y[i : i + 250]
        adv = pgd_attack(
            model, xb, yb, eps=eps, step_size=eps / 4, steps=20, generator=torch.Generator().manual_seed(i)
        )
        with torch.no_grad():
            hits["clean"] += int((model(xb).argmax(1) == yb).sum())
            hits["pgd20"] += int((model(adv).argmax(1) == yb).sum())
            for name in CORRUPTIONS:
                hits["corruptions"] += int((model(corrupt(name, xb, 3, seed=i)).argmax(1) == yb).sum())
    out = {k: v / len(x) for k, v in hits.items()}
    out["corruptions"] /= len(CORRUPTIONS)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--part",
        required=True,
        help="dense, a finetune.loss (pgd, ard, rslad, ...), several (pgd,ard), or all (dense,pgd,ard,rslad)",
    )
    parser.add_argument("--setting", choices=("tiny", "reduced", "full"), default="reduced")
    parser.add_argument("--budget", type=float, default=4.0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/distill-finetune"))
    parser.add_argument(
        "--out", type=Path, default=REPO / "bench/results/distill-finetune-fashion-mnist.json"
    )
    args = parser.parse_args()
    if args.part == "all" or "," in args.part:  # one process: the dense model, then each loss
        for part in ("dense", "pgd", "ard", "rslad") if args.part == "all" else args.part.split(","):
            sys.argv = [sys.argv[0], *_replace(sys.argv[1:], part)]
            main()
        return
    torch.set_num_threads(2)
    r = recipe(args.setting, args.budget, "pgd" if args.part == "dense" else args.part)
    data = preflight.check(r)
    eps = r.validate.attacks[0].eps
    work = args.work / f"{args.setting}-x{args.budget:g}"
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    row: dict[str, Any]
    if args.part == "dense":
        torch.manual_seed(r.seed)
        dense = preflight.recipe_model(r, data)
        train_model(dense, _loader(r, data, 0), r.train, seed=r.seed, progress=False)
        _save(dense, [], work / "dense.pt")
        pruned = copy.deepcopy(dense)
        example = torch.zeros(1, data.channels, *data.input_hw)
        job = preflight.prune_job(r, pruned, example, lambda o: _loader(r, data, o), False)
        result = prune_model(pruned, job, r.prune)
        _save(result.model, result.history, work / "pruned.pt")
        row = {"model": "dense", **evaluate(dense, data, eps)}
        row["pruned_before_finetune"] = evaluate(result.model, data, eps)
        row["macs_reduction"] = result.macs_reduction
    else:
        dense, pruned = _load(work / "dense.pt", r, data), _load(work / "pruned.pt", r, data)
        torch.manual_seed(r.seed)
        train_model(pruned, _loader(r, data, 2), r.finetune, seed=r.seed + 100, progress=False, teacher=dense)
        row = {"model": f"magnitude+{args.part}", "loss": args.part, **evaluate(pruned, data, eps)}
    row.update(seconds=round(time.perf_counter() - started), setting=args.setting, budget=args.budget)
    print(json.dumps(row))
    rows = json.loads(args.out.read_text())["runs"] if args.out.is_file() else []
    key = ("model", "setting", "budget")
    rows = [x for x in rows if any(x.get(k) != row.get(k) for k in key)] + [row]
    payload = {
        "benchmark": "distill_finetune",
        "dataset": "fashion-mnist",
        "split": "test",
        "recipe": "bench/aer.py base_recipe('fashion-mnist', setting); prune: iterative magnitude, 1 step",
        "finetune": {
            k: v for k, v in r.finetune.model_dump(mode="json").items() if k not in ("mixed", "loss")
        },
        "evaluation": f"clean, PGD-20 (eps {eps}, step eps/4), mean accuracy over "
        f"{', '.join(CORRUPTIONS)} at severity 3",
        "seeds": [r.seed],
        "runs": rows,
    }
    args.out.write_text(json.dumps(payload, indent=2) + "\n")


def _replace(argv: list[str], part: str) -> list[str]:
    """``argv`` with the value of ``--part`` replaced."""
    out = list(argv)
    out[out.index("--part") + 1] = part
    return out


def _save(model: nn.Module, history: list[Any], path: Path) -> None:
    spec = dict(model.spec)  # type: ignore[arg-type]  # a NormalizedClassifier's
    save_pruned(path, spec=spec, history=history, state_dict=model.state_dict())


def _load(path: Path, r: Recipe, data: DataBundle) -> nn.Module:
    return load_pruned(path, trusted_builder(r), torch.zeros(1, data.channels, *data.input_hw))[0]


if __name__ == "__main__":
    main()
