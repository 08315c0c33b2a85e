"""The ``robustprune`` command: parse, load the recipe, call one verb. No logic lives here.

Exit codes, for every verb: 0 success; 1 a gate failed (``run``, ``validate``, ``gate``) or a
model did not go through ``inspect --trial``; 2 a usage or input error; 3 an internal error (a
bug). Errors are one line on stderr; ``--debug`` also prints the traceback (the exit code stays
the same).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from exporters.errors import resource_error
from toolchain.errors import UserError

EXIT_OK, EXIT_GATE_FAILED, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3
_SET_HELP = "override a recipe key, e.g. train.epochs=2 (repeatable)"
# A full or read-only disk is the user's to fix (exit 2), not a bug.
_DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse's default exit code is also 2; keep one line
        self.exit(EXIT_USAGE, f"robustprune: error: {message} (see robustprune --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="robustprune",
        description="Prune PyTorch vision models while keeping them robust, export them to ONNX, "
        "and validate robustness on the exported engine itself.",
        epilog="Exit codes: 0 success, 1 a gate failed, 2 bad input, 3 internal error (a bug).",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run (or resume) a recipe end to end")
    run.add_argument("recipe", help="YAML recipe")
    run.add_argument("--out", help="run directory (default runs/<recipe name>)")
    run.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE", help=_SET_HELP
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bars")

    val = sub.add_parser("validate", help="run a recipe's validate section on an exported ONNX file")
    val.add_argument("--engine", required=True, help="ONNX file (from a run directory or your own)")
    val.add_argument("--recipe", required=True, help="recipe whose data and validate sections to use")
    val.add_argument("--out", help="folder for report.json (default: beside the engine, validate-<name>)")
    val.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE", help=_SET_HELP
    )
    val.add_argument("--no-progress", action="store_true", help="no progress bars")

    cor = sub.add_parser("corruptions", help="list corruptions or save a grid image of them")
    cor.add_argument("--list", action="store_true", help="print the registered corruptions")
    cor.add_argument("--grid", metavar="PNG", help="write a grid of one image under every corruption")
    cor.add_argument("--dataset", default="signs", help="dataset the grid image comes from")
    cor.add_argument("--index", type=int, default=0, help="which validation image")
    cor.add_argument("--seed", type=int, default=0, help="seed of the corruptions' random draws")

    ins = sub.add_parser(
        "inspect",
        help="before pruning: dependency groups, what is left alone and why, the largest reachable reduction",
    )
    ins.add_argument(
        "target",
        metavar="MODEL_OR_RECIPE",
        help="a recipe file, or a model.arch such as torchvision:resnet18",
    )
    ins.add_argument(
        "--input-size", type=int, help="square input side for a model name (default 224 torchvision, 32 zoo)"
    )
    ins.add_argument("--channels", type=int, default=3, help="input channels for a model name")
    ins.add_argument("--classes", type=int, default=10, help="classes for a model name")
    ins.add_argument("--max-layer-pruning", type=float, help="default: the recipe's, or 0.9")
    ins.add_argument("--round-to", type=int, help="default: the recipe's, or none")
    ins.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE", help=_SET_HELP
    )
    ins.add_argument("--json", dest="json_out", metavar="FILE", help="also write the report as JSON")
    ins.add_argument("--layers", action="store_true", help="list MACs and params per layer")
    ins.add_argument(
        "--trial",
        action="store_true",
        help="also run the pipeline with tiny settings (signs data, 2x MACs, ONNX parity); exit 1 on failure",
    )

    bench = sub.add_parser(
        "bench", help="latency of dense FP32, pruned FP32 and pruned INT8 side by side (ONNX Runtime CPU)"
    )
    bench.add_argument("--arch", default="resnet18", help="zoo architecture (default resnet18)")
    bench.add_argument("--image-size", type=int, default=32, help="square input side")
    bench.add_argument("--classes", type=int, default=10, help="classes of the model's head")
    bench.add_argument("--width", type=float, default=1.0, help="channel multiplier of the zoo model")
    bench.add_argument("--reductions", default="2,4,8", help="MACs reductions of the pruned models")
    bench.add_argument("--int8", default="4", help="which reductions also run in INT8 ('' for none)")
    bench.add_argument("--schemes", default="u8s8,s8s8", help="INT8 schemes to time")
    bench.add_argument("--batches", default="1,32", help="batch sizes to time")
    bench.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (pinned)")
    bench.add_argument("--round-to", default="16", help="channel multiple, or 'none'")
    bench.add_argument(
        "--optimization",
        default="all",
        choices=["disable", "basic", "extended", "all"],
        help="ONNX Runtime graph optimisation level",
    )
    bench.add_argument("--iterations", type=int, default=600, help="timed calls at batch 1 (fewer per batch)")
    bench.add_argument(
        "--min-iterations",
        type=int,
        default=200,
        help="fewest timed calls at any batch size (p99 needs many)",
    )
    bench.add_argument("--out", help="write the JSON result here")

    sel = sub.add_parser(
        "select",
        help="try pruning methods x fine-tuning losses on held-out images (data.holdout) and pick the most "
        "robust at the budget",
    )
    sel.add_argument("recipe", help="YAML recipe (with data.holdout set)")
    sel.add_argument(
        "--methods", nargs="+", default=[], help="prune.method values to try (default: the recipe's)"
    )
    sel.add_argument(
        "--losses", nargs="+", default=[], help="finetune.loss values to try (default: pgd ard rslad)"
    )
    sel.add_argument("--out", help="write every candidate's numbers here (default runs/<name>/select.json)")
    sel.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE", help=_SET_HELP
    )
    sel.add_argument("--no-progress", action="store_true", help="no progress bars")

    doctor = sub.add_parser("doctor", help="what this machine can run, and what a recipe needs")
    doctor.add_argument("--recipe", help="also check what this recipe needs")
    doctor.add_argument("--json", action="store_true", help="print JSON instead of text")

    gate = sub.add_parser("gate", help="check a report.json against gates; exit 1 if one fails")
    gate.add_argument("report", help="report.json")
    gate.add_argument("--policy", help="YAML with a 'gates' list (default: the report's own gates)")
    gate.add_argument("--baseline", help="baseline report.json for relative gates")
    gate.add_argument("--junit", help="also write the result as JUnit XML here")
    gate.add_argument("--recipe", help="refuse the report unless this recipe produced it (same sha256)")
    gate.add_argument(
        "--write-baseline",
        action="store_true",
        help="with --baseline B: when every gate passes, save the report as B (a missing B is "
        "bootstrapped: the report is gated against itself); for the main branch's CI job",
    )
    gate.add_argument(
        "--allow-unverified",
        action="store_true",
        help="pass a report with no gate or no evaluation of an exported file (never for a release)",
    )

    cmp = sub.add_parser("compare", help="two report.json files side by side (two releases or methods)")
    cmp.add_argument("report_a", help="report.json (A)")
    cmp.add_argument("report_b", help="report.json (B)")
    cmp.add_argument("--format", choices=("text", "md"), default="text", help="terminal table or Markdown")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script and ``python -m toolchain``."""
    args = _parser().parse_args(argv)
    # Libraries (onnxscript, torch.export) log a great deal at INFO; show ours only.
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    # Under torchrun only rank 0 logs progress; the other ranks report warnings and errors.
    ours = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    for package in ("toolchain", "exporters", "calibration"):
        logging.getLogger(package).setLevel(logging.DEBUG if args.debug else ours)
    try:
        return _dispatch(args)
    except UserError as exc:
        if args.debug:
            traceback.print_exc()
        sys.stderr.write(f"robustprune: error: {_one_line(exc)}\n")
        return EXIT_USAGE
    except OSError as exc:
        if exc.errno not in _DISK_ERRORS:
            return _internal_error(exc, args.debug)
        if args.debug:
            traceback.print_exc()
        where = f"{exc.filename}: " if exc.filename else ""
        sys.stderr.write(
            f"robustprune: error: {where}{exc.strerror}; free disk space or fix the permissions, or choose "
            "another --out (artifacts are written atomically: finished stages are kept, re-run to resume)\n"
        )
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("robustprune: interrupted; re-run the same command to resume\n")
        return 130
    except Exception as exc:  # anything else is a bug (say so, never as "a gate failed") or out of memory
        resource = resource_error(exc, f"running robustprune {args.verb}")
        if resource is None:
            return _internal_error(exc, args.debug)
        if args.debug:
            traceback.print_exc()
        sys.stderr.write(f"robustprune: error: {_one_line(resource)}\n")
        return EXIT_USAGE


def _internal_error(exc: BaseException, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    sys.stderr.write(
        f"robustprune: internal error: {type(exc).__name__}: {_one_line(exc)}. This is a bug; "
        "re-run with --debug for the traceback\n"
    )
    return EXIT_INTERNAL


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _dispatch(args: argparse.Namespace) -> int:
    from toolchain import commands

    if args.verb == "run":
        return commands.run(args.recipe, args.out, args.overrides, progress=not args.no_progress)
    if args.verb == "validate":
        return commands.validate(
            args.engine, args.recipe, args.out, args.overrides, progress=not args.no_progress
        )
    if args.verb == "corruptions":
        return commands.corruptions(args.list, args.grid, args.dataset, args.index, args.seed)
    if args.verb == "bench":
        return commands.bench(args)
    if args.verb == "select":
        return commands.select(
            args.recipe, args.methods, args.losses, args.out, args.overrides, progress=not args.no_progress
        )
    if args.verb == "doctor":
        return commands.doctor(args.recipe, as_json=args.json)
    if args.verb == "gate":
        return commands.gate(
            Path(args.report),
            args.policy,
            args.baseline,
            args.junit,
            args.recipe,
            args.allow_unverified,
            write_baseline=args.write_baseline,
        )
    if args.verb == "compare":
        return commands.compare(args.report_a, args.report_b, args.format)
    if args.verb == "inspect":
        return commands.inspect(
            args.target,
            input_size=args.input_size,
            channels=args.channels,
            classes=args.classes,
            max_layer_pruning=args.max_layer_pruning,
            round_to=args.round_to,
            overrides=args.overrides,
            json_out=args.json_out,
            layers=args.layers,
            trial=args.trial,
        )
    raise AssertionError(args.verb)  # argparse only accepts the verbs above


if __name__ == "__main__":
    sys.exit(main())
