"""What each CLI verb does, as plain functions (the CLI only parses arguments).

Each returns the process exit code: 0 pass, 1 a gate failed; bad input raises a
:class:`~toolchain.errors.UserError` (exit 2).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from toolchain.errors import RecipeError, UserError
from toolchain.recipe import Gate, load_recipe

log = logging.getLogger(__name__)

EXIT_OK, EXIT_GATE_FAILED = 0, 1


def _announce_failures(gates: list[Any], intrinsic: list[Any], where: str) -> None:
    """Under GitHub Actions, a failed gate is also an ``::error::`` annotation on stdout."""
    from toolchain.report.junit import github_annotations

    if os.environ.get("GITHUB_ACTIONS") == "true":
        for line in github_annotations(gates, intrinsic, where):
            sys.stdout.write(line + "\n")


def run(recipe_path: str, out: str | None, overrides: list[str], *, progress: bool = True) -> int:
    """``robustprune run``: the whole pipeline; exit 1 if a gate failed."""
    from toolchain.distributed import launched_rank
    from toolchain.pipeline import run_pipeline
    from toolchain.report.markdown import render_summary
    from toolchain.report.writer import mark_stale_before_start

    if out and launched_rank() == 0:  # before the recipe is read: a refused one leaves no old verdict
        mark_stale_before_start(Path(out))
    recipe = load_recipe(recipe_path, overrides)
    run_dir = Path(out) if out else Path("runs") / recipe.name
    report = run_pipeline(recipe, run_dir, progress=progress)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for the run
        sys.stdout.write(render_summary(report, run_dir) + "\n")
        _announce_failures(report.gates, report.intrinsic_gates, str(run_dir / "report.json"))
    return EXIT_OK if report.passed else EXIT_GATE_FAILED


def select(
    recipe_path: str,
    methods: list[str],
    losses: list[str],
    out: str | None,
    overrides: list[str],
    *,
    progress: bool = True,
) -> int:
    """``robustprune select``: every (method, loss) candidate scored on held-out images; the
    record goes to ``out`` and a table to stdout."""
    from toolchain.selection import select as run_selection

    recipe = load_recipe(recipe_path, overrides)
    record = run_selection(recipe, methods, losses, progress=progress)
    path = Path(out) if out else Path("runs") / recipe.name / "select.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"{'method':<12} {'loss':<7} {'MACs x':>7} {'clean':>7} {'robust':>7}"]
    dense = record["dense"]
    lines.append(f"{'(dense)':<12} {'':<7} {1.0:>7.2f} {dense['clean']:>7.4f} {dense['robust']:>7.4f}")
    for c in record["candidates"]:
        flag = "" if c["target_met"] else "  (budget missed)"
        numbers = f"{c['macs_reduction']:>7.2f} {c['clean']:>7.4f} {c['robust']:>7.4f}"
        lines.append(f"{c['method']:<12} {c['loss']:<7} {numbers}{flag}")
    chosen = record["chosen"]
    lines.append(
        f"chosen: {' '.join('--set ' + k for k in chosen['set'])}"
        if chosen
        else "chosen: none met the budget"
    )
    sys.stdout.write("\n".join(lines) + f"\n(held-out images: {record['holdout']}; record: {path})\n")
    return EXIT_OK


def validate(
    engine: str, recipe_path: str, out: str | None, overrides: list[str], *, progress: bool = True
) -> int:
    """``robustprune validate``: the validate section on one exported ONNX file."""
    from toolchain.report.markdown import render_summary
    from toolchain.report.writer import mark_stale_before_start
    from toolchain.validate_engine import validate_engine

    engine_path = Path(engine)
    out_dir = Path(out) if out else engine_path.parent / f"validate-{engine_path.stem}"
    mark_stale_before_start(out_dir)  # before the recipe is read: a refused one leaves no old verdict
    recipe = load_recipe(recipe_path, overrides)
    report = validate_engine(engine_path, recipe, out_dir, progress=progress)
    sys.stdout.write(render_summary(report, out_dir) + "\n")
    _announce_failures(report.gates, report.intrinsic_gates, str(out_dir / "report.json"))
    return EXIT_OK if report.passed else EXIT_GATE_FAILED


def corruptions(show_list: bool, grid: str | None, dataset: str, index: int, seed: int) -> int:
    """``robustprune corruptions``: list them, or write a grid image of one input."""
    from toolchain.robustness.corruptions import CORRUPTIONS
    from toolchain.robustness.corruptions.grid import save_corruption_grid

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
    return EXIT_OK


def _numbers(text: str, what: str, kind: type = float) -> tuple[Any, ...]:
    try:
        return tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"--{what} must be comma-separated numbers, got {text!r}") from None


def bench(args: argparse.Namespace) -> int:
    """``robustprune bench``: the latency study; prints a table, optionally writes JSON."""
    from toolchain.latency_study import LatencyStudy, render_latency_study, run_latency_study

    round_to = None if args.round_to.lower() == "none" else _numbers(args.round_to, "round-to", int)[0]
    study = LatencyStudy(
        arch=args.arch,
        image_size=args.image_size,
        num_classes=args.classes,
        width=args.width,
        reductions=_numbers(args.reductions, "reductions"),
        int8_reductions=_numbers(args.int8, "int8"),
        int8_schemes=tuple(s for s in args.schemes.split(",") if s),
        batches=_numbers(args.batches, "batches", int),
        threads=args.threads,
        round_to=round_to,
        optimization=args.optimization,
        iterations=args.iterations,
        min_iterations=args.min_iterations,
    )
    if args.out and Path(args.out).is_dir():
        raise UserError(f"--out {args.out!r} is a folder; pass a .json file path")
    result = run_latency_study(study)
    if args.out:
        from toolchain.rundir import write_json

        write_json(Path(args.out), result)
    sys.stdout.write(render_latency_study(result) + "\n")
    return 0


def doctor(recipe_path: str | None, *, as_json: bool = False) -> int:
    """``robustprune doctor``: exit 0, or 1 when the recipe needs something this machine lacks."""
    from toolchain.doctor import recipe_needs, render_doctor
    from toolchain.machine import probe

    machine = probe()
    needs = recipe_needs(load_recipe(recipe_path), machine) if recipe_path else None
    if as_json:
        sys.stdout.write(json.dumps({"machine": machine, "needs": needs}, indent=2) + "\n")
    else:
        sys.stdout.write(render_doctor(machine, needs) + "\n")
    return 1 if needs and any(n["required"] and not n["ok"] for n in needs) else 0


def _read_yaml(path: str, what: str) -> Any:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} {path!r} not found")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"{what} {path!r} is not valid YAML/JSON: {str(exc).splitlines()[0]}") from None


def _policy_gates(policy: str) -> list[Gate]:
    raw = _read_yaml(policy, "policy")
    raw_gates = raw.get("gates") if isinstance(raw, dict) else raw
    try:
        return TypeAdapter(list[Gate]).validate_python(raw_gates)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise RecipeError(f"policy {policy}: gates.{where}: {err['msg']}") from None


def _completed(report: Any, path: Path, what: str) -> Any:
    """``report`` if a completed run wrote it; a stale or crashed run's report is no verdict."""
    from toolchain.report.schema import COMPLETED

    if report.status != COMPLETED:
        said = (
            "no status (written before reports recorded completion)"
            if report.status is None
            else report.status
        )
        raise UserError(
            f"{what}{path} is not the report of a completed run ({said}): the run that should have "
            "written it crashed, is still running or was refused; re-run it and gate the new report"
        )
    return report


def gate(
    report_path: Path,
    policy: str | None,
    baseline: str | None,
    junit: str | None,
    recipe_path: str | None = None,
    allow_unverified: bool = False,
    *,
    write_baseline: bool = False,
) -> int:
    """``robustprune gate``: exit 0 if every gate passes, 1 if one fails (missing metrics fail).

    The intrinsic gates are re-checked from the report's numbers, whatever it says it passed;
    with no gate (a policy listing none, or a report whose recipe had none) or no evaluation of
    an exported file it fails, unless ``allow_unverified``. With ``write_baseline`` (and a
    ``baseline`` path), a missing baseline is bootstrapped (the report is its own baseline:
    relative gates pass, absolute ones decide) and a report that passes every gate becomes
    the baseline.

    Raises:
        UserError: the report is missing or not a report, is not from a completed run
            (``status`` not ``completed``: the run crashed, or a later run started), or was
            not produced by ``recipe_path``; a bad policy; a baseline that is not a completed
            run's report.
    """
    from toolchain.report.gates import evaluate_gates, verdict, verdict_gates
    from toolchain.report.junit import write_junit
    from toolchain.report.schema import read_report

    report = _completed(read_report(report_path), report_path, "")
    if recipe_path:
        expected = load_recipe(recipe_path).sha256()
        if report.recipe_sha256 != expected:
            raise UserError(
                f"{report_path} was produced by another recipe (sha256 {report.recipe_sha256[:12]}), "
                f"not by {recipe_path} ({expected[:12]}); run that recipe and gate its report"
            )
    if write_baseline and not baseline:
        raise UserError("--write-baseline needs --baseline PATH: where to save the baseline")
    gates: list[Any] = _policy_gates(policy) if policy else [g.model_dump() for g in report.gates]
    args_baseline = baseline or ""
    bootstrap = write_baseline and baseline is not None and not Path(baseline).exists()
    if bootstrap:
        sys.stdout.write(f"no baseline at {baseline} yet: the report is its own baseline (first run)\n")
        baseline = str(report_path)
    base = (
        _completed(read_report(baseline, "baseline report"), Path(baseline), "baseline ")
        if baseline
        else None
    )
    results = evaluate_gates(report, gates, base)
    intrinsic = verdict_gates(report, results, allow_unverified=allow_unverified)
    for check in intrinsic:
        sys.stdout.write(f"{'PASS' if check.passed else 'FAIL'} intrinsic {check.name}: {check.detail}\n")
    for row in results:
        status = "PASS" if row.passed else "FAIL"
        value = "missing" if row.value is None else f"{row.value:.6g}"
        rel = f" ({row.relative} vs baseline)" if row.relative else ""
        sys.stdout.write(f"{status} {row.metric}{rel} {row.op} {row.threshold:g}: {value}\n")
        if row.error:
            sys.stdout.write(f"     {row.error}\n")
    _announce_failures(results, intrinsic, str(report_path))
    if junit:
        write_junit(Path(junit), results, intrinsic)
    passed = verdict(results, intrinsic)
    if write_baseline and passed:
        _save_baseline(report_path, Path(args_baseline))
    return EXIT_OK if passed else EXIT_GATE_FAILED


def _save_baseline(report: Path, baseline: Path) -> None:
    """Copy the gated report to ``baseline`` atomically: the next run is gated against it."""
    from toolchain.rundir import atomic_path

    with atomic_path(baseline) as tmp:
        tmp.write_bytes(report.read_bytes())
    sys.stdout.write(f"baseline {baseline} is now this report\n")


def compare(report_a: str, report_b: str, fmt: str) -> int:
    """``robustprune compare A B``: the two reports side by side, on stdout."""
    from toolchain.report.compare import render_comparison
    from toolchain.report.schema import read_report

    a, b = read_report(report_a, "report A"), read_report(report_b, "report B")
    sys.stdout.write(render_comparison(a, b, (f"A: {report_a}", f"B: {report_b}"), fmt) + "\n")
    return EXIT_OK


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
        budget = recipe.prune.target
        if budget.metric == "latency":
            # Measured at run time, not counted: the MACs ceiling is all that is known here.
            line = (
                f"recipe target latency_reduction {budget.reduction:g}: searched by timing when the "
                f"prune stage runs; at most {report.max_macs_reduction:.2f}x fewer MACs are reachable"
            )
        else:
            reachable = (
                report.max_params_reduction if budget.metric == "params" else report.max_macs_reduction
            )
            ok = reachable >= budget.reduction * (1 - recipe.prune.tolerance)
            line = f"recipe target {budget.metric}_reduction {budget.reduction:g}: "
            line += "reachable" if ok else "OUT OF REACH"
        sys.stdout.write(line + "\n")
    if json_out:
        Path(json_out).write_text(json.dumps({"model": title, **report.to_dict()}, indent=1))
    if trial:
        from toolchain.trial import run_trial

        arch = recipe.model.arch if recipe else target
        size = int(example.shape[-1])
        with tempfile.TemporaryDirectory(prefix="robustprune-trial-") as work:
            result = run_trial(arch, size, work)
        details = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in result.to_dict().items()
            if v is not None and k not in ("arch", "outcome")
        )
        sys.stdout.write(f"trial: {result.outcome} ({details})\n")
        return EXIT_OK if result.outcome == "works" else EXIT_GATE_FAILED
    return EXIT_OK


def _inspected_model(
    target: str, input_size: int | None, channels: int, classes: int, overrides: list[str]
) -> tuple[Any, Any, Any, str]:
    """(model, example input, recipe or None, title) for a recipe file or a model name."""
    import torch

    from toolchain.models import arch_task, build_model

    if Path(target).is_file():
        from toolchain.data import load_data
        from toolchain.preflight import recipe_model

        recipe = load_recipe(target, overrides)
        d = recipe.data
        data = load_data(
            d.dataset, root=d.root, image_size=d.image_size, train_samples=1, val_samples=1, task=recipe.task
        )
        torch.manual_seed(recipe.seed)
        model = recipe_model(recipe, data)
        example = torch.zeros(1, data.channels, *data.input_hw)
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
        task=arch_task(target),
    )
    return model, torch.zeros(1, channels, size, size), None, target
