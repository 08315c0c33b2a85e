"""Accuracy-efficiency-robustness of every pruning method, on the same dense model and images.

    python bench/aer.py [--dataset fashion-mnist|signs] [--setting reduced|full]
                        [--methods magnitude hydra ...] [--losses pgd ard rslad ...]
                        [--budgets 2 4 8 16] [--seeds 0 1 2]
                        [--seeds-at 4] [--shared-dense] [--dense-lr 0.05] [--dense-epochs N]
                        [--network builtin|anchor] [--split test|holdout]
                        [--work runs/aer] [--out FILE]
    python bench/aer.py ... --collect          # JSON + plots of the finished runs only
    python bench/aer.py --render FILE.json     # the README's markdown table from a result

For each seed one dense model is adversarially trained (the recipe's ``train`` stage), or with
``--shared-dense`` every seed starts from the first seed's dense model, so the spread over seeds
is that of the method (pruning and fine-tuning) alone; every (method, budget) run then starts
from a copy of that run directory, so the dense weights are the very same, and goes through
the real pipeline: prune with the method, fine-tune, export, validate (clean, PGD-20 and
APGD-CE white-box, Square, corruptions) and bench (ONNX Runtime latency at batch 1 and 32).
``--losses`` runs each method with each fine-tuning loss (PGD-AT, TRADES, or distillation from
the dense model: ARD, RSLAD, RSLAD with a consistency term on corrupted images); a pair is
named ``method/loss`` (``method`` alone for PGD-AT). Every method gets the same training after
the dense model: its in-the-loop epochs plus fine-tuning epochs add up to ``after_epochs``, with
the same attack.

``--setting full`` runs 2/4/8/16x by default; ``reduced`` (fewer images and epochs, 6 corruptions)
runs 4x and 8x, every method, so that it finishes in under half an hour on 2 cores.

Runs write their own run directory under ``--work``; a finished run (its report.json) is never
redone, so an interrupted benchmark continues where it stopped, and a new run whose dense model
an earlier invocation already trained (a finished train stage with the same key) copies it.
``--split holdout`` evaluates on images held out from the training split (``data.holdout``),
for choosing settings; the numbers to report come from ``--split test``. Results: JSON
(``--out``) and plots beside it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

log = logging.getLogger("aer")

CORRUPTIONS = [
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "motion_blur",
    "zoom_blur",
    "brightness",
    "contrast",
    "fog",
    "jpeg_compression",
    "pixelate",
    "low_light",
]


#: Per setting: images (train, test), dense epochs, training epochs after the dense model,
#: attack steps (PGD, APGD), Square (images, queries), corruptions, latency iterations.
#: ``budgets``: the MACs reductions run when ``--budgets`` is not given (the reduced setting
#: keeps two, so that every method still runs and the whole benchmark fits in half an hour).
SETTINGS: dict[str, dict[str, Any]] = {
    "full": {"epochs": 8, "after": 4, "steps": 20, "square": (200, 500), "corruptions": CORRUPTIONS,
             "budgets": [2.0, 4.0, 8.0, 16.0]},
    "reduced": {"epochs": 4, "after": 2, "steps": 20, "square": (200, 200), "corruptions": CORRUPTIONS[::2],
                "budgets": [4.0, 8.0]},
    "tiny": {"epochs": 2, "after": 2, "steps": 2, "square": (20, 10), "corruptions": CORRUPTIONS[:2],
             "budgets": [2.0]},
}  # fmt: skip
SIZES = {
    "fashion-mnist": {"full": (20000, 2000), "reduced": (6000, 1000), "tiny": (256, 64)},
    "signs": {"full": (4000, 1000), "reduced": (2000, 500), "tiny": (256, 64)},
}


def base_recipe(dataset: str, setting: str) -> dict[str, Any]:
    """The dense training and evaluation shared by every run of a (dataset, setting)."""
    if dataset == "fashion-mnist":
        eps = 0.1
        attack = {"eps": eps, "step_size": 0.025, "steps": 5}
        model = {"arch": "convnet", "width": 1.0}
        data: dict[str, Any] = {"dataset": dataset, "batch_size": 128}
    elif dataset == "signs":
        eps = 4 / 255
        attack = {"eps": eps, "step_size": 2 / 255, "steps": 3}
        model = {"arch": "resnet20", "width": 0.5}
        data = {"dataset": dataset, "image_size": 32, "batch_size": 64}
    else:
        raise SystemExit(f"unknown dataset {dataset!r}; use fashion-mnist or signs")
    s = SETTINGS[setting]
    if setting == "tiny":  # the test suite's end-to-end check of the benchmark itself
        model = {"arch": "convnet", "width": 0.5}
        data.update(image_size=16, batch_size=64)
        attack = {**attack, "steps": 1}
    train_samples, val_samples = SIZES[dataset][setting]
    square_samples, queries = s["square"]
    return {
        "version": 1,
        "data": {**data, "train_samples": train_samples, "val_samples": val_samples},
        "model": model,
        "train": {
            "epochs": s["epochs"],
            "lr": 0.05,
            "loss": "pgd",
            "schedule": "onecycle",
            "nesterov": True,
            "attack": attack,
        },
        "finetune": {"lr": 0.01, "loss": "pgd", "attack": attack},
        "validate": {
            "samples": val_samples,
            "batch_size": 250,
            "runtimes": ["torch"],
            "attacks": [
                {"name": "pgd", "eps": eps, "steps": s["steps"], "step_size": eps / 4},
                {"name": "apgd", "eps": eps, "steps": s["steps"]},
                {
                    "name": "square",
                    "eps": eps,
                    "queries": queries,
                    "samples": min(square_samples, val_samples),
                },
            ],
            "corruptions": {"names": s["corruptions"], "severities": [1, 3, 5]},
        },
        "bench": {
            "runtimes": ["onnxruntime"],
            "batch_sizes": [1, 32],
            "iterations": 100 if setting != "tiny" else 3,
        },
        "export": {"parity_samples": 128},
    }


def _in_loop(train: dict[str, Any], epochs: int, **extra: Any) -> dict[str, Any]:
    return {"epochs": epochs, "attack": train["attack"], **extra}


def method_patch(method: str, budget: float, after: int, base: dict[str, Any]) -> dict[str, Any]:
    """The prune and finetune sections of one run: ``after`` training epochs in all."""
    attack = base["train"]["attack"]
    target = {"macs_reduction": budget}
    half = max(1, after // 2)
    scoring = {**attack, "steps": min(attack["steps"], 3)}
    if method in ("magnitude", "taylor", "adv-taylor", "random"):
        prune = {"method": "iterative", "criterion": method, "steps": 1, "attack": scoring}
        return {"prune": {**prune, "target": target}, "finetune": {"epochs": after}}
    if method == "mrs":
        probe = {"probe_attack": scoring}
        prune = {"method": "mrs", "criterion": "magnitude", "target": target, "mrs": probe}
        return {"prune": prune, "finetune": {"epochs": after}}
    if method in ("lowrank", "channels+lowrank"):
        section: dict[str, Any] = {"channel_reduction": math.sqrt(budget)} if method != "lowrank" else {}
        prune = {"method": "lowrank", "criterion": "magnitude", "target": target, "lowrank": section}
        return {"prune": prune, "finetune": {"epochs": after}}
    sections: dict[str, Callable[[], dict[str, Any]]] = {
        "hydra": lambda: {"train": _in_loop(base["train"], half, loss="trades", lr=0.1, weight_decay=1e-4)},
        "bap": lambda: {"train": _in_loop(base["train"], half, loss="hybrid", lr=0.01), "update_every": 20},
        "dnr": lambda: {"train": _in_loop(base["train"], after, loss="hybrid", lr=0.01), "update_every": 20},
        "gated": lambda: {"train": _in_loop(base["train"], half, loss="mixed", lr=0.01)},
    }
    if method not in sections:
        raise SystemExit(f"unknown method {method!r}; known: {', '.join(METHOD_NAMES)}")
    in_loop = sections[method]()
    epochs = in_loop["train"]["epochs"]
    return {
        "prune": {"method": method, "target": target, method: in_loop},
        "finetune": {"epochs": after - epochs},
    }


#: Fine-tuning losses a run can take instead of the recipe's PGD-AT (``--losses``): the
#: distillation losses learn from the dense model the run pruned (the recipe's ``distill``
#: defaults: RSLAD's w = 5/6, T = 1); ``rslad+corr`` adds the consistency term on corrupted images.
LOSSES: dict[str, dict[str, Any]] = {
    "pgd": {},
    "trades": {"loss": "trades"},
    "ard": {"loss": "ard"},
    "rslad": {"loss": "rslad"},
    "rslad+corr": {"loss": "rslad", "distill": {"corruption_weight": 1.0}},
}


def run_label(method: str, loss: str) -> str:
    """How a (method, fine-tuning loss) pair is named in tables, plots and run directories."""
    return method if loss == "pgd" else f"{method}/{loss}"


METHOD_NAMES = [
    "magnitude",
    "taylor",
    "adv-taylor",
    "random",
    "hydra",
    "bap",
    "dnr",
    "gated",
    "mrs",
    "lowrank",
    "channels+lowrank",
]


def _merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(base))
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def finished(out: Path) -> bool:
    """A run directory whose run went to its end (its report.json is the one to use)."""
    return (out / "report.json").is_file() and (out / "aer.done").is_file()


def recipe_digest(recipe: dict[str, Any]) -> str:
    """What ``aer.done`` records of the recipe a run finished with (its dense checkpoint's path
    left out, so that a moved work directory still matches)."""
    kept = {**recipe, "model": {k: v for k, v in recipe["model"].items() if k != "checkpoint"}}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def other_recipe(out: Path, recipe: dict[str, Any]) -> bool:
    """True when ``out`` holds a finished run of a different recipe (markers written before the
    digest was recorded say only "ok" and are taken as matching)."""
    if not finished(out):
        return False
    mark = (out / "aer.done").read_text().strip()
    return mark != "ok" and mark != recipe_digest(recipe)


def dense_donor(work: Path, recipe: dict[str, Any]) -> Path | None:
    """A run directory under ``work`` whose train stage finished with ``recipe``'s train key: the
    dense model this run would train, which a new run then copies instead of training again."""
    from toolchain.pipeline import stage_keys
    from toolchain.recipe import recipe_from_dict

    key = stage_keys(recipe_from_dict(recipe))["train"]
    for record in sorted(work.glob("*/train/stage.json")):
        try:
            if json.loads(record.read_text()).get("key") == key:
                return record.parent.parent
        except (OSError, ValueError, AttributeError):
            continue
    return None


def _run(recipe: dict[str, Any], out: Path, dense_from: Path | None) -> dict[str, Any]:
    """One pipeline run (or its finished report), starting from ``dense_from``'s train stage."""
    from toolchain.pipeline import run_pipeline
    from toolchain.recipe import recipe_from_dict

    if finished(out):
        return json.loads((out / "report.json").read_text())
    if dense_from is not None and not (out / "train").exists():
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy2(dense_from / "run.json", out / "run.json")
        shutil.copytree(dense_from / "train", out / "train")
    report = run_pipeline(recipe_from_dict(recipe), out, progress=False).to_json()
    (out / "aer.done").write_text(recipe_digest(recipe) + "\n")
    return report


def summarize(report: dict[str, Any], model: str) -> dict[str, Any]:
    """The numbers the table shows, from one report."""
    (ev,) = [e for e in report["evaluations"] if e["model"] == model and e["runtime"] == "torch"]
    attacks = {a["name"]: a["accuracy"] for a in ev["attacks"]}
    row: dict[str, Any] = {
        "clean": ev["clean_accuracy"],
        "pgd20": attacks.get("pgd"),
        "apgd_ce": attacks.get("apgd"),
        "square": attacks.get("square"),
        "corruptions_mean": ev.get("corruptions", {}).get("mean_accuracy"),
        "relative_mce": ev.get("corruptions", {}).get("relative_mce"),
        "macs": report["models"][model]["macs"],
        "params": report["models"][model]["params"],
    }
    for entry in report.get("latency", []):
        if entry["model"] == model and entry["runtime"] == "onnxruntime":
            row[f"ort_p50_ms_b{entry['batch']}"] = entry["p50_ms"]
    return row


def anchor_scores(run: Path, stage: str) -> dict[str, float]:
    """A run's model (``train``: dense, ``finetune``: pruned) scored as the plain-script anchor
    scores its own: on the first 2,000 Fashion-MNIST test images, clean, PGD-20 with the
    project's attack, and PGD-20 with the script's (weaker, unprojected-start) attack
    (``bench/dense_gap.py``), so the anchor's figures are compared under the same attack."""
    import dense_gap  # bench/: the anchor's network and attack
    import torch

    from toolchain.models.factory import trusted_builder
    from toolchain.pruning.io import load_pruned
    from toolchain.recipe import load_recipe

    recipe = load_recipe(run / "recipe.yaml")
    model, _ = load_pruned(run / stage / "model.pt", trusted_builder(recipe), torch.zeros(1, 1, 28, 28))
    scores = dense_gap.evaluate(model.eval(), dense_gap._first_images("test", dense_gap.TEST_IMAGES))
    return {f"anchor_{key}": value for key, value in scores.items()}


def _mean_std(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in rows[0]:
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        if len(values) == len(rows):
            out[key] = statistics.fmean(values)
            out[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion-mnist", choices=["fashion-mnist", "signs"])
    parser.add_argument("--setting", default="full", choices=sorted(SETTINGS))
    parser.add_argument(
        "--methods", nargs="+", default=[m for m in METHOD_NAMES if m != "random"], choices=METHOD_NAMES
    )
    parser.add_argument(
        "--budgets", nargs="+", type=float, default=None, help="default: full 2 4 8 16, reduced 4 8"
    )
    parser.add_argument(
        "--losses",
        nargs="+",
        default=["pgd"],
        choices=sorted(LOSSES),
        help="fine-tuning losses, each run with every method (default: the recipe's pgd)",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument(
        "--seeds-at", type=float, default=4.0, help="budget run with every seed (others: first)"
    )
    parser.add_argument(
        "--after-epochs", type=int, default=None, help="training epochs after the dense model"
    )
    parser.add_argument(
        "--shared-dense",
        action="store_true",
        help="every seed starts from the first seed's dense model: the spread is the method's "
        "(pruning and fine-tuning), not the dense training's",
    )
    parser.add_argument(
        "--dense-lr",
        type=float,
        default=0.05,
        help="peak one-cycle learning rate of the dense model (0.05: the README's tables; 0.2 and 0.4 "
        "measured 5-6 points better on held-out images, see bench/dense_lr.py)",
    )
    parser.add_argument(
        "--network",
        default="builtin",
        choices=["builtin", "anchor"],
        help="builtin: the dataset's built-in model (convnet / resnet20); anchor (Fashion-MNIST): "
        "the plain-script anchor's five-conv network as a user factory (dense_gap:anchor_net), to "
        "compare absolute numbers with that script at the same budget",
    )
    parser.add_argument("--dense-epochs", type=int, default=None, help="default: the setting's")
    parser.add_argument(
        "--reference",
        type=Path,
        default=None,
        help="a JSON of another tool's results on the same task (the plain-script anchor's), "
        "kept in the result under 'reference' so that tables can set the runs beside it",
    )
    parser.add_argument("--split", default="test", choices=["test", "holdout"])
    parser.add_argument("--work", default=str(REPO / "runs" / "aer"))
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--collect",
        action="store_true",
        help="start no run: write the JSON and plots of the finished runs among those asked for",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)

    args.budgets = args.budgets or SETTINGS[args.setting]["budgets"]
    base = base_recipe(args.dataset, args.setting)
    base["train"]["lr"] = args.dense_lr
    base["train"]["epochs"] = args.dense_epochs or base["train"]["epochs"]
    if args.network == "anchor":
        if args.dataset != "fashion-mnist":
            parser.error(
                "--network anchor is the Fashion-MNIST anchor's network; use --dataset fashion-mnist"
            )
        base["model"] = {"arch": "dense_gap:anchor_net"}  # bench/ is this script's import path
    after = args.after_epochs or SETTINGS[args.setting]["after"]
    if args.split == "holdout":
        base["data"]["holdout"] = base["data"].pop("val_samples")
        base["data"]["val_samples"] = None
    tag = f"{args.dataset}-{args.setting}-{args.split}" + ("-anchor" if args.network == "anchor" else "")
    work = Path(args.work) / tag
    out_path = Path(args.out or REPO / "bench" / "results" / f"aer-{tag}.json")
    started = time.perf_counter()
    runs: list[dict[str, Any]] = []
    dense_rows: dict[int, dict[str, Any]] = {}
    first_dense: Path | None = None
    for seed in args.seeds:
        dense_dir: Path | None = None
        for budget in args.budgets:
            if seed != args.seeds[0] and not math.isclose(budget, args.seeds_at):
                continue
            for method, loss in [(m, loss) for m in args.methods for loss in args.losses]:
                label = run_label(method, loss)
                recipe = _merge(
                    _merge(base, method_patch(method, budget, after, base)), {"finetune": LOSSES[loss]}
                )
                dirname = label.replace("+", "_").replace("/", "-")
                if args.after_epochs is not None:  # beside the default's runs, from the same dense model
                    dirname += f"-a{after}"
                recipe.update(name=f"{dirname}-x{budget:g}-s{seed}", seed=seed)
                if seed != args.seeds[0]:  # every seed trains on and is tested on the same images
                    recipe["data"]["seed"] = args.seeds[0]
                    if args.shared_dense and first_dense is not None:
                        # The seed is part of every stage's cache key, so the first seed's dense
                        # weights come in as this seed's starting checkpoint, trained 0 epochs.
                        recipe["model"]["checkpoint"] = str(first_dense / "train" / "model.pt")
                        recipe["train"]["epochs"] = 0
                out = work / recipe["name"]
                if other_recipe(out, recipe):
                    print(
                        f"error: {out} holds a finished run of another recipe (a different --dense-lr or "
                        "--dense-epochs?); use another --work, or remove that directory",
                        file=sys.stderr,
                    )
                    return 2
                if args.collect and not finished(out):
                    log.info("%s: not run yet, left out (--collect)", recipe["name"])
                    continue
                donor = dense_dir
                if donor is None and not finished(out) and not (out / "train").exists():
                    donor = dense_donor(work, recipe)  # an earlier invocation's dense model
                    if donor is not None:
                        log.info("%s: dense model from %s (same train key)", recipe["name"], donor.name)
                t0 = time.perf_counter()
                report = _run(recipe, out, donor)
                log.info("%s done in %.0f s", recipe["name"], time.perf_counter() - t0)
                dense_dir = dense_dir or out
                first_dense = first_dense or out
                if seed not in dense_rows:
                    dense_rows[seed] = summarize(report, "dense")
                    if args.network == "anchor":
                        dense_rows[seed].update(anchor_scores(out, "train"))
                stages = report.get("stage_seconds", {})
                runs.append(
                    {
                        "method": label,
                        "pruning": method,
                        "loss": loss,
                        "budget": budget,
                        "seed": seed,
                        "macs_reduction": report["models"]["pruned"]["macs_reduction"],
                        "target_met": report["models"]["pruned"]["target_met"],
                        "prune_seconds": stages.get("prune"),
                        "finetune_seconds": stages.get("finetune"),
                        **summarize(report, "pruned"),
                        **(anchor_scores(out, "finetune") if args.network == "anchor" else {}),
                    }
                )
                _write(out_path, args, base, after, dense_rows, runs, time.perf_counter() - started)
    _write(out_path, args, base, after, dense_rows, runs, time.perf_counter() - started)
    write_plots(out_path)
    sys.stdout.write(f"wrote {out_path} and its plots\n")
    return 0


def _write(
    out_path: Path,
    args: argparse.Namespace,
    base: dict[str, Any],
    after: int,
    dense: dict[int, dict[str, Any]],
    runs: list[dict[str, Any]],
    seconds: float,
) -> None:
    table: dict[str, dict[str, Any]] = {}
    for run in runs:
        key = f"{run['method']}@{run['budget']:g}"
        table.setdefault(key, {"method": run["method"], "budget": run["budget"], "rows": []})["rows"].append(
            run
        )
    summary = {
        key: {"method": v["method"], "budget": v["budget"], "seeds": len(v["rows"]), **_mean_std(v["rows"])}
        for key, v in table.items()
    }
    payload = {
        "benchmark": "aer",
        "dataset": args.dataset,
        "setting": args.setting,
        "split": args.split,
        "after_epochs": after,
        "shared_dense": bool(args.shared_dense),
        "network": args.network,
        "reference": _reference(args.reference),
        "base_recipe": base,
        # --collect ran nothing: its time is not the benchmark's (each run's stages keep theirs)
        "wall_seconds": None if args.collect else round(seconds, 1),
        "collected": bool(args.collect),
        "dense": {str(seed): row for seed, row in dense.items()},
        "dense_summary": _mean_std(list(dense.values())) if dense else {},
        "summary": summary,
        # relative mCE as report.json defines it now: a corruption the dense model does not
        # degrade on is counted against a floor of 1 point per severity, never left out.
        "relative_mce_rule": RELATIVE_MCE_RULE,
        "runs": runs,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(payload, indent=2) + "\n")


def _reference(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    return {"source": path.name, "results": json.loads(path.read_text())}


PLOTTED = (
    ("clean", "clean accuracy"),
    ("pgd20", "PGD-20 accuracy"),
    ("corruptions_mean", "corruption accuracy"),
)


def write_plots(json_path: Path) -> list[Path]:
    """Clean, PGD-20 and corruption accuracy against MACs, one line per method (PNG beside the JSON)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    payload = json.loads(json_path.read_text())
    dense = payload["dense_summary"]
    by_method: dict[str, list[dict[str, Any]]] = {}
    for row in payload["summary"].values():
        by_method.setdefault(row["method"], []).append(row)
    written = []
    budgets = {row["budget"] for row in payload["summary"].values()}
    for key, label in PLOTTED:
        fig, ax = plt.subplots(figsize=(7.5, 4))
        ax.set_prop_cycle(color=plt.get_cmap("tab20").colors)  # 11 methods: the default cycle repeats at 10
        if len(budgets) == 1:  # one budget: a bar per method says more than a dot each
            _bars(ax, payload, key, label, next(iter(budgets)))
            path = json_path.with_name(f"{json_path.stem}-{key}.png")
            fig.tight_layout()
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
            continue
        for method, rows in sorted(by_method.items()):
            rows = sorted((r for r in rows if r.get(key) is not None), key=lambda r: r["macs"])
            if not rows:
                continue
            ax.errorbar(
                [r["macs"] / 1e6 for r in rows],
                [100 * r[key] for r in rows],
                yerr=[100 * r.get(f"{key}_std", 0.0) for r in rows],
                marker="o",
                capsize=3,
                label=method,
            )
        if dense.get(key) is not None:
            ax.axhline(100 * dense[key], color="gray", linestyle="--", label="dense")
        ax.set_xscale("log")
        # one tick per budget (at its mean MACs): the log axis alone labels only decades
        groups = _by_budget(payload)
        ticks = sorted({round(statistics.fmean(r["macs"] for r in group) / 1e6, 3) for group in groups})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("MMACs per image (log)")
        ax.set_ylabel(f"{label} (%)")
        ax.set_title(f"{payload['dataset']} ({payload['setting']}, {payload['split']} split): {label}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside, not over, the lines
        path = json_path.with_name(f"{json_path.stem}-{key}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _by_budget(payload: dict[str, Any]) -> list[list[dict[str, Any]]]:
    """The summary rows grouped by budget (the dense model as its own group)."""
    groups: dict[float, list[dict[str, Any]]] = {1.0: [payload["dense_summary"]]}
    for row in payload["summary"].values():
        groups.setdefault(row["budget"], []).append(row)
    return list(groups.values())


def _bars(ax: Any, payload: dict[str, Any], key: str, label: str, budget: float) -> None:
    """One horizontal bar per method (best on top, with its seed spread), the dense model as a line."""
    rows = sorted((r for r in payload["summary"].values() if r.get(key) is not None), key=lambda r: r[key])
    ax.barh(
        [r["method"] for r in rows],
        [100 * r[key] for r in rows],
        xerr=[100 * r.get(f"{key}_std", 0.0) for r in rows],
        color="tab:blue",
        capsize=3,
    )
    dense = payload["dense_summary"].get(key)
    if dense is not None:
        ax.axvline(100 * dense, color="gray", linestyle="--", label="dense")
        ax.legend(fontsize=8, loc="lower right")
    low = min(100 * r[key] for r in rows) if rows else 0.0
    ax.set_xlim(max(0.0, low - 5), 100 * max([dense or 0.0] + [r[key] for r in rows]) + 2)
    ax.set_xlabel(f"{label} (%)")
    ax.set_title(
        f"{payload['dataset']} ({payload['setting']}, {payload['split']} split), {budget:g}x fewer MACs"
    )
    ax.grid(axis="x", alpha=0.3)


RELATIVE_MCE_RULE = "floored"
EARLIER_RULE_NOTE = (
    "rel. mCE*: measured before relative mCE counted the corruptions the dense model does not "
    "degrade on (they were left out, so a loss on them did not show); re-run the benchmark for "
    "today's rule, which counts them against a floor of 1 point per severity."
)


def render_table(payload: dict[str, Any]) -> str:
    """The README's table: one row per (method, budget), mean over seeds, deltas against dense.

    A result measured under the earlier relative-mCE rule says so under the table."""
    dense = payload["dense_summary"]
    earlier = payload.get("relative_mce_rule") != RELATIVE_MCE_RULE

    def pct(value: float | None) -> str:
        return "–" if value is None else f"{100 * value:.1f}"

    def delta(row: dict[str, Any], key: str) -> str:
        if row.get(key) is None or dense.get(key) is None:
            return "–"
        return f"{100 * (row[key] - dense[key]):+.1f}"

    lines = [
        "| method | budget | MACs ↓ | clean | Δ | PGD-20 | Δ | APGD-CE | Square | corruptions | Δ "
        f"| rel. mCE{'*' if earlier else ''} | prune s | fine-tune s | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| dense | – | 1.00× | {pct(dense.get('clean'))} | | {pct(dense.get('pgd20'))} | "
        f"| {pct(dense.get('apgd_ce'))} | {pct(dense.get('square'))} | {pct(dense.get('corruptions_mean'))} "
        "| | 1.00 | | | |",
    ]
    runs = payload["runs"]
    for row in sorted(payload["summary"].values(), key=lambda r: (r["budget"], -r.get("pgd20", 0))):
        mine = [r for r in runs if r["method"] == row["method"] and r["budget"] == row["budget"]]
        prune_s = statistics.fmean(r["prune_seconds"] or 0.0 for r in mine)
        finetune_s = statistics.fmean(r["finetune_seconds"] or 0.0 for r in mine)
        mce = row.get("relative_mce")
        lines.append(
            f"| {row['method']} | {row['budget']:g}× | {row.get('macs_reduction', float('nan')):.2f}× "
            f"| {_with_spread(row, 'clean')} | {delta(row, 'clean')} "
            f"| {_with_spread(row, 'pgd20')} | {delta(row, 'pgd20')} "
            f"| {_with_spread(row, 'apgd_ce')} | {pct(row.get('square'))} "
            f"| {_with_spread(row, 'corruptions_mean')} "
            f"| {delta(row, 'corruptions_mean')} | {'–' if mce is None else f'{mce:.2f}'} "
            f"| {prune_s:.0f} | {finetune_s:.0f} | {row['seeds']} |"
        )
    if earlier:
        lines += ["", EARLIER_RULE_NOTE]
    return "\n".join(lines)


#: The robust-pruning goals per budget: the most a pruned model may lose against its dense model
#: (accuracy points as fractions) and the highest relative mCE it may have.
GOALS: dict[float, dict[str, float]] = {
    4.0: {"clean": 0.01, "pgd20": 0.02, "relative_mce": 1.10},
    8.0: {"clean": 0.02, "pgd20": 0.03},
}


def goal_misses(row: dict[str, Any], dense: dict[str, Any]) -> list[str] | None:
    """What a summary row misses of its budget's goal ([] when it meets it; None: no goal there)."""
    goal = next((g for budget, g in GOALS.items() if math.isclose(budget, row["budget"])), None)
    if goal is None:
        return None
    misses = [
        f"{label} {100 * (row[key] - dense[key]):+.1f}"
        for key, label in (("clean", "clean"), ("pgd20", "PGD-20"))
        if row[key] - dense[key] < -goal[key] - 1e-9
    ]
    if "relative_mce" in goal and row["relative_mce"] > goal["relative_mce"]:
        misses.append(f"rel. mCE {row['relative_mce']:.2f}")
    return misses


def _with_spread(row: dict[str, Any], key: str) -> str:
    """A mean in percent, with ± the standard deviation over seeds where there are several."""
    if row.get(key) is None:
        return "–"
    std = row.get(f"{key}_std")
    return f"{100 * row[key]:.1f}" + (f" ± {100 * std:.1f}" if row["seeds"] > 1 and std is not None else "")


def render_goals(payload: dict[str, Any]) -> str:
    """One row per (method, budget) with a goal (:data:`GOALS`): deltas against dense, the verdict."""
    dense = payload["dense_summary"]
    lines = [
        "| method / fine-tuning loss | budget | seeds | clean | Δ | PGD-20 | Δ | corruptions "
        "| rel. mCE | goal |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(payload["summary"].values(), key=lambda r: (r["budget"], -r["pgd20"])):
        misses = goal_misses(row, dense)
        if misses is None:
            continue
        verdict = "met" if not misses else "missed: " + ", ".join(misses)
        lines.append(
            f"| {row['method']} | {row['budget']:g}× | {row['seeds']} "
            f"| {_with_spread(row, 'clean')} | {100 * (row['clean'] - dense['clean']):+.1f} "
            f"| {_with_spread(row, 'pgd20')} | {100 * (row['pgd20'] - dense['pgd20']):+.1f} "
            f"| {100 * row['corruptions_mean']:.1f} | {row['relative_mce']:.2f} | {verdict} |"
        )
    lines.append(
        f"| dense | – | – | {100 * dense['clean']:.1f} | | {100 * dense['pgd20']:.1f} | "
        f"| {100 * dense['corruptions_mean']:.1f} | 1.00 | |"
    )
    return "\n".join(lines)


def render_verdicts(payload: dict[str, Any]) -> str:
    """One clause per budget with a goal: the deltas against dense and the verdict (prose)."""
    dense = payload["dense_summary"]
    parts = []
    for row in sorted(payload["summary"].values(), key=lambda r: r["budget"]):
        misses = goal_misses(row, dense)
        if misses is None:
            continue
        seeds = f"{row['seeds']} seeds" if row["seeds"] > 1 else "1 seed"
        parts.append(
            f"at {row['budget']:g}× ({seeds}) {100 * (row['clean'] - dense['clean']):+.1f} clean / "
            f"{100 * (row['pgd20'] - dense['pgd20']):+.1f} PGD-20 points, relative mCE "
            f"{row['relative_mce']:.2f}: goal {'met' if not misses else 'missed'}"
        )
    return "; ".join(parts)


def render_reference(payload: dict[str, Any]) -> str:
    """The runs beside the reference tool's result nearest in MACs reduction (``--reference``).

    With the anchor's own scoring in the rows (``anchor_scores``: its test images, clean, and
    PGD-20 with the project's attack and with the script's), the comparison is made there: clean
    against clean, and PGD-20 under the script's attack against the script's PGD-20."""
    ref = payload["reference"]["results"]
    points = {name: entry.get("macs_reduction", 1.0) for name, entry in ref.items()}
    rows = [{**payload["dense_summary"], "method": "dense", "macs_reduction": 1.0, "seeds": 1}]
    rows += sorted(payload["summary"].values(), key=lambda r: (r["budget"], -r["pgd20"]))
    like_for_like = all("anchor_pgd20_unprojected" in row for row in rows)
    if like_for_like:
        lines = [
            "| model | MACs ↓ | clean | PGD-20 | PGD-20, the script's attack | plain script: MACs ↓, clean / "
            "PGD-20 | above the script |",
            "|---|---|---|---|---|---|---|",
        ]
    else:
        lines = [
            "| model | MACs ↓ | clean | PGD-20 | plain script: MACs ↓, clean / PGD-20 | above the script |",
            "|---|---|---|---|---|---|",
        ]
    for row in rows:
        name = min(points, key=lambda n: abs(math.log(points[n] / row["macs_reduction"])))
        other = ref[name]
        clean_key, pgd_key = ("clean", "pgd20")
        if like_for_like:  # the script's scoring: its images, and PGD-20 with its attack
            clean_key, pgd_key = ("anchor_clean", "anchor_pgd20_unprojected")
        above = [
            label
            for value, key, label in ((row[clean_key], "clean", "clean"), (row[pgd_key], "pgd20", "PGD-20"))
            if value > other[key]  # the mean over seeds
        ]
        verdict = {2: "both", 1: f"{above[0]} only" if above else "", 0: "neither"}[len(above)]
        shown = (clean_key, "anchor_pgd20", pgd_key) if like_for_like else (clean_key, pgd_key)
        measured = " | ".join(_percent_over_seeds(row, key) for key in shown)
        seeds = int(row.get("seeds", 1))
        model = row["method"] + (f" ({seeds} seeds)" if seeds > 1 else "")
        lines.append(
            f"| {model} | {row['macs_reduction']:.2f}× | {measured} | {points[name]:.2f}×, "
            f"{100 * other['clean']:.1f} / {100 * other['pgd20']:.1f} | {verdict} |"
        )
    return "\n".join(lines)


def _percent_over_seeds(row: dict[str, Any], key: str) -> str:
    """A percentage, with its standard deviation over seeds when there are several."""
    text = f"{100 * row[key]:.1f}"
    return text + (f" ± {100 * row[key + '_std']:.1f}" if int(row.get("seeds", 1)) > 1 else "")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--render":
        sys.stdout.write(render_table(json.loads(Path(sys.argv[2]).read_text())) + "\n")
        sys.exit(0)
    sys.exit(main())
