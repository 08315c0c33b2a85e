#!/usr/bin/env bash
# Jetson Orin: prepare on a workstation, then build engines, validate and benchmark on the device.
#
#   deploy_examples/jetson/run.sh --prepare [RUN_DIR]   on the workstation (CPU or GPU, no TensorRT
#                                                        needed): train -> prune -> fine-tune ->
#                                                        export -> quantize, validated on CPU
#   deploy_examples/jetson/run.sh [RUN_DIR]             on the Jetson, in a copy of RUN_DIR: the
#                                                        finished stages are skipped (same recipe
#                                                        keys); engine -> validate -> bench run there
#
# The stage keys of train..quantize do not depend on the validate, bench or engine sections, so the
# device run resumes the workstation's run directory instead of training again. The engine stage's
# key includes the installed TensorRT version: JetPack 6 (TensorRT 10) builds with builder
# precision flags, JetPack 7 (TensorRT 11) with strongly typed networks (FP16 from a float16 copy
# of the ONNX file, INT8 from the symmetric Q/DQ file); robustprune picks by version.
# RECIPE=path overrides the recipe (default recipe.yaml beside this script).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
recipe=${RECIPE:-$here/recipe.yaml}
prepare=0
if [ "${1:-}" = "--prepare" ]; then
  prepare=1
  shift
fi
run_dir=${1:-runs/jetson-orin-mobilenetv2}

if [ "$prepare" -eq 1 ]; then
  echo "== workstation: everything up to the INT8 files, validated on ONNX Runtime CPU"
  # No verdict here: the gates (the recipe's and the INT8 gate) judge the device run's engines.
  # A preparation, not a release, so it says so with allow_unverified (a run with no gate fails
  # otherwise).
  robustprune run "$recipe" --out "$run_dir" --no-progress \
    --set 'validate.runtimes=[torch, onnxruntime]' --set 'bench.runtimes=[onnxruntime]' --set 'gates=[]' \
    --set 'quantize.gate=null' --set allow_unverified=true
  echo "now copy $run_dir to the Jetson (rsync -a $run_dir jetson:robustprune/$run_dir) and run $0 there"
  exit 0
fi

echo "== device: what this Jetson can do (TensorRT version, CUDA), and what the recipe needs"
robustprune doctor --recipe "$recipe"
echo "== device: engine -> validate -> bench (finished stages are skipped)"
robustprune run "$recipe" --out "$run_dir" --no-progress
echo "report: $run_dir/report.json; copy it back: rsync -a jetson:robustprune/$run_dir/report.* ."
