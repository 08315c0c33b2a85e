"""What each CLI verb does, as plain functions (the CLI only parses arguments)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from toolchain.errors import RecipeError, UserError
from toolchain.recipe import Gate, load_recipe

log = logging.getLogger(__name__)


def run(recipe_path: str, out: str | None, overrides: list[str], *, progress: bool = True) -> int:
    """``robustprune run``: the whole pipeline; exit 1 if a gate failed."""
    from toolchain.pipeline import run_pipeline
    from toolchain.report.markdown import render_summary

    recipe = load_recipe(recipe_path, overrides)
    run_dir = Path(out) if out else Path("runs") / recipe.name
    report = run_pipeline(recipe, run_dir, progress=progress)
    sys.stdout.write(render_summary(report, run_dir) + "\n")
    return 0 if report["passed"] else 1


def validate(
    engine: str, recipe_path: str, out: str | None, overrides: list[str], *, progress: bool = True
) -> int:
    """``robustprune validate``: the validate section on one exported ONNX file."""
    from toolchain.report.markdown import render_summary
    from toolchain.validate_engine import validate_engine

    recipe = load_recipe(recipe_path, overrides)
    engine_path = Path(engine)
    out_dir = Path(out) if out else engine_path.parent / f"validate-{engine_path.stem}"
    report = validate_engine(engine_path, recipe, out_dir, progress=progress)
    sys.stdout.write(render_summary(report, out_dir) + "\n")
    return 0 if report["passed"] else 1


def corruptions(show_list: bool, grid: str | None, dataset: str, index: int, seed: int) -> int:
    """``robustprune corruptions``: list them, or write a grid image of one input."""
    from toolchain.robustness.corruptions import CORRUPTIONS, save_corruption_grid

    if not show_list and not grid:
        raise UserError("corruptions: pass --list, or --grid PNG to write a grid image")
    if show_list:
        for name in CORRUPTIONS.names():
            family = getattr(CORRUPTIONS.get(name), "family", "")
            sys.stdout.write(f"{name}\t{family}\n")
    if grid:
        from toolchain.data import load_data

        data = load_data(dataset, val_samples=max(index + 1, 1), train_samples=1, seed=seed)
        available = len(data.val)  # type: ignore[arg-type]
        if not 0 <= index < available:
            raise UserError(f"--index {index} is out of range; the validation split has {available} images")
        image, _ = data.val[index]
        save_corruption_grid(image, grid, seed=seed)
        sys.stdout.write(f"wrote {grid}\n")
    return 0


def _read_yaml(path: str, what: str) -> Any:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} {path!r} not found")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"{what} {path!r} is not valid YAML/JSON: {str(exc).splitlines()[0]}") from None


def gate(report_path: Path, policy: str | None, baseline: str | None, junit: str | None) -> int:
    """``robustprune gate``: exit 0 if every gate passes, 1 if one fails (missing metrics fail)."""
    from toolchain.report.gates import evaluate_gates
    from toolchain.report.junit import write_junit

    report = _read_yaml(str(report_path), "report")
    if not isinstance(report, dict) or not str(report.get("schema", "")).startswith("robustprune.report/"):
        raise UserError(f"{report_path} is not a robustprune report.json (no 'schema' key)")
    if policy:
        raw = _read_yaml(policy, "policy")
        raw_gates = raw.get("gates") if isinstance(raw, dict) else raw
        try:
            gates = TypeAdapter(list[Gate]).validate_python(raw_gates)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise RecipeError(f"policy {policy}: gates.{where}: {err['msg']}") from None
    else:
        gates = [
            Gate.model_validate({k: v for k, v in g.items() if k in Gate.model_fields})
            for g in report.get("gates", [])
        ]
    if not gates:
        raise UserError(
            "no gates to check: pass --policy FILE with a 'gates' list, or put gates in the recipe"
        )
    base = _read_yaml(baseline, "baseline report") if baseline else None
    results = evaluate_gates(report, gates, base)
    for row in results:
        status = "PASS" if row["passed"] else "FAIL"
        value = "missing" if row["value"] is None else f"{row['value']:.6g}"
        rel = f" ({row['relative']} vs baseline)" if row.get("relative") else ""
        sys.stdout.write(f"{status} {row['metric']}{rel} {row['op']} {row['threshold']:g}: {value}\n")
        if row.get("error"):
            sys.stdout.write(f"     {row['error']}\n")
    if junit:
        write_junit(Path(junit), results)
    return 0 if all(r["passed"] for r in results) else 1


def inspect(
    target: str,
    *,
    input_size: int | None,
    channels: int,
    classes: int,
    max_layer_pruning: float | None,
    round_to: int | None,
    overrides: list[str],
    json_out: str | None,
    layers: bool,
    trial: bool,
) -> int:
    """``robustprune inspect``: what pruning can do to a model (a recipe's, or one named), before
    any training; with ``trial``, also run the pipeline on it with tiny settings."""
    import json
    import tempfile

    from toolchain.pruning.prunability import assess

    model, example, recipe, title = _inspected_model(target, input_size, channels, classes, overrides)
    mlp = (
        max_layer_pruning
        if max_layer_pruning is not None
        else (recipe.prune.max_layer_pruning if recipe else 0.9)
    )
    rounding = round_to if round_to is not None else (recipe.prune.round_to if recipe else None)
    report = assess(model, example, max_layer_pruning=mlp, round_to=rounding)
    sys.stdout.write(report.render(title, layers=layers) + "\n")
    if recipe is not None:
        target_reduction = recipe.prune.target.macs_reduction or recipe.prune.target.params_reduction
        reachable = (
            report.max_macs_reduction if recipe.prune.target.macs_reduction else report.max_params_reduction
        )
        verdict = (
            "reachable" if reachable >= target_reduction * (1 - recipe.prune.tolerance) else "OUT OF REACH"
        )
        sys.stdout.write(
            f"recipe target {recipe.prune.target.metric}_reduction {target_reduction:g}: {verdict}\n"
        )
    if json_out:
        Path(json_out).write_text(json.dumps({"model": title, **report.to_dict()}, indent=1))
    if trial:
        from toolchain.trial import run_trial

        arch = recipe.model.arch if recipe else target
        size = int(example.shape[-1])
        with tempfile.TemporaryDirectory(prefix="robustprune-trial-") as work:
            result = run_trial(arch, size, work)
        details = ", ".join(f"{k}={v}" for k, v in result.to_dict().items() if v is not None and k != "arch")
        sys.stdout.write(f"trial: {result.outcome} ({details})\n")
        return 0 if result.outcome == "works" else 1
    return 0


def _inspected_model(
    target: str, input_size: int | None, channels: int, classes: int, overrides: list[str]
) -> tuple[Any, Any, Any, str]:
    """(model, example input, recipe or None, title) for a recipe file or a model name."""
    import torch

    from toolchain.models import build_model

    if Path(target).is_file():
        from toolchain.data import load_data
        from toolchain.preflight import recipe_model

        recipe = load_recipe(target, overrides)
        d = recipe.data
        data = load_data(d.dataset, root=d.root, image_size=d.image_size, train_samples=1, val_samples=1)
        torch.manual_seed(recipe.seed)
        model = recipe_model(recipe, data)
        example = torch.zeros(1, data.channels, data.image_size, data.image_size)
        return model, example, recipe, f"{recipe.model.arch} ({target})"
    if overrides:
        raise UserError("--set applies to a recipe; pass a recipe file, or --input-size/--channels/--classes")
    size = input_size or (224 if target.startswith("torchvision:") else 32)
    torch.manual_seed(0)
    model = build_model(
        target,
        num_classes=classes,
        in_channels=channels,
        mean=[0.5] * channels,
        std=[0.25] * channels,
        image_size=size,
    )
    return model, torch.zeros(1, channels, size, size), None, target
