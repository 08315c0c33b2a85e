#!/usr/bin/env bash
# Desktop / datacenter GPU: export -> quantize -> engine -> validate -> bench, then a summary.
#
#   deploy_examples/desktop_gpu/run.sh [RUN_DIR]       (default runs/desktop-gpu-resnet18)
#
# RECIPE=path overrides the recipe (default: recipe.yaml beside this script). Extra robustprune
# options go in ROBUSTPRUNE_ARGS (e.g. "--set train.epochs=1"). Stops before writing anything
# when this machine lacks what the recipe needs (TensorRT, CUDA): `robustprune doctor` says what.
# Exit codes: those of robustprune (0 pass, 1 a gate failed or something is missing, 2 bad input).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
recipe=${RECIPE:-$here/recipe.yaml}
run_dir=${1:-runs/desktop-gpu-resnet18}

echo "== what this machine can do, and what the recipe needs"
robustprune doctor --recipe "$recipe"

echo "== train -> prune -> fine-tune -> export -> quantize -> engine -> validate -> bench"
# shellcheck disable=SC2086  # ROBUSTPRUNE_ARGS is a list of options
robustprune run "$recipe" --out "$run_dir" --no-progress ${ROBUSTPRUNE_ARGS:-}
echo "report: $run_dir/report.json  (human: $run_dir/report.md)"
