#!/usr/bin/env bash
# Robustness gate for a release pipeline.
#
#   deploy_examples/ci_gate/gate.sh RECIPE BASELINE_REPORT [RUN_DIR]
#
# Runs (or resumes) the recipe, then checks its report against policy.yaml, absolute floors
# and regressions relative to BASELINE_REPORT (the last release's report.json). Writes JUnit
# XML beside the report so the CI system shows one test case per gate.
# Exit codes: 0 every gate passed, 1 a gate failed, 2 bad input.
set -euo pipefail
recipe=${1:?usage: gate.sh RECIPE BASELINE_REPORT [RUN_DIR]}
baseline=${2:?usage: gate.sh RECIPE BASELINE_REPORT [RUN_DIR]}
run_dir=${3:-runs/release-candidate}
here=$(cd "$(dirname "$0")" && pwd)

# The recipe's own gates decide `run`'s exit code; the policy below is the release decision.
robustprune run "$recipe" --out "$run_dir" --no-progress || [ $? -eq 1 ]
robustprune gate "$run_dir/report.json" --policy "$here/policy.yaml" --baseline "$baseline" \
  --junit "$run_dir/gates.junit.xml"
