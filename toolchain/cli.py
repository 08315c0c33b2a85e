"""The ``robustprune`` command: parse, load the recipe, call one verb. No logic lives here.

Exit codes: 0 success; 1 a gate failed (``run``, ``validate``, ``gate``) or a model did not go
through ``inspect --trial``; 2 a usage or input error, reported as one line on stderr
(``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from toolchain.errors import UserError

EXIT_OK, EXIT_GATE_FAILED, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse's default exit code is also 2; keep one line
        self.exit(EXIT_USAGE, f"robustprune: error: {message} (see robustprune --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="robustprune",
        description="Prune PyTorch vision models while keeping them robust, export them to ONNX, "
        "and validate robustness on the exported engine itself.",
        epilog="Exit codes: 0 success, 1 a gate failed, 2 bad input.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run (or resume) a recipe end to end")
    run.add_argument("recipe", help="YAML recipe")
    run.add_argument("--out", help="run directory (default runs/<recipe name>)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")

    val = sub.add_parser("validate", help="run a recipe's validate section on an exported ONNX file")
    val.add_argument("--engine", required=True, help="ONNX file (from a run directory or your own)")
    val.add_argument("--recipe", required=True, help="recipe whose data and validate sections to use")
    val.add_argument("--out", help="folder for report.json (default: beside the engine, validate-<name>)")
    val.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    val.add_argument("--no-progress", action="store_true")

    cor = sub.add_parser("corruptions", help="list corruptions or save a grid image of them")
    cor.add_argument("--list", action="store_true", help="print the registered corruptions")
    cor.add_argument("--grid", metavar="PNG", help="write a grid of one image under every corruption")
    cor.add_argument("--dataset", default="signs", help="dataset the grid image comes from")
    cor.add_argument("--index", type=int, default=0, help="which validation image")
    cor.add_argument("--seed", type=int, default=0)

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
    ins.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ins.add_argument("--json", dest="json_out", metavar="FILE", help="also write the report as JSON")
    ins.add_argument("--layers", action="store_true", help="list MACs and params per layer")
    ins.add_argument(
        "--trial",
        action="store_true",
        help="also run the pipeline with tiny settings (signs data, 2x MACs, ONNX parity); exit 1 on failure",
    )

    gate = sub.add_parser("gate", help="check a report.json against gates; exit 1 if one fails")
    gate.add_argument("report", help="report.json")
    gate.add_argument("--policy", help="YAML with a 'gates' list (default: the report's own gates)")
    gate.add_argument("--baseline", help="baseline report.json for relative gates")
    gate.add_argument("--junit", help="also write the result as JUnit XML here")
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
    for package in ("toolchain", "exporters", "calibration"):
        logging.getLogger(package).setLevel(logging.DEBUG if args.debug else logging.INFO)
    try:
        return _dispatch(args)
    except UserError as exc:
        if args.debug:
            raise
        sys.stderr.write(f"robustprune: error: {exc}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("robustprune: interrupted; re-run the same command to resume\n")
        return 130


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
    if args.verb == "gate":
        return commands.gate(Path(args.report), args.policy, args.baseline, args.junit)
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
