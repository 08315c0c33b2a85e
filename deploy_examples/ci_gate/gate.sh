#!/usr/bin/env bash
# Robustness gate for a release pipeline.
#
#   deploy_examples/ci_gate/gate.sh RECIPE BASELINE_REPORT [RUN_DIR]
#
# Runs (or resumes) the recipe, then checks its report against policy.yaml: absolute floors
# and regressions relative to BASELINE_REPORT (the last release's report.json). Writes JUnit
# XML beside the report so the CI system shows one test case per gate.
#
# A crashed run can never pass: `robustprune run` exits 0 (its recipe's gates passed) or 1 (one
# failed) only after writing a completed report; any other code (2 bad input, 3 internal error,
# a kill) stops here with that code. `robustprune gate` then refuses a report that is not
# from a completed run, or that another recipe produced (--recipe).
# WRITE_BASELINE=1 (the main branch's job): a missing BASELINE_REPORT is bootstrapped (the report
# is gated against itself) and a report that passes every gate becomes BASELINE_REPORT; keep that
# file (commit it, or cache it) for the merge requests' jobs, which run without it.
# Exit codes: 0 every gate passed, 1 a gate failed, 2 bad input, 3 internal error.
set -uo pipefail
usage="usage: gate.sh RECIPE BASELINE_REPORT [RUN_DIR]"
recipe=${1:?$usage}
baseline=${2:?$usage}
run_dir=${3:-runs/release-candidate}
here=$(cd "$(dirname "$0")" && pwd)

if [ "${WRITE_BASELINE:-0}" != "1" ] && [ ! -f "$baseline" ]; then
  echo "gate.sh: no baseline report at $baseline: run the main branch's job first (WRITE_BASELINE=1 bootstraps it)" >&2
  exit 2
fi

robustprune run "$recipe" --out "$run_dir" --no-progress
status=$?
# The recipe's own gates decide 0 or 1; the policy below is the release decision.
if [ "$status" -ne 0 ] && [ "$status" -ne 1 ]; then
  echo "gate.sh: robustprune run exited $status (not a gate result): no release" >&2
  exit "$status"
fi
extra=()
if [ "${WRITE_BASELINE:-0}" = "1" ]; then
  extra=(--write-baseline)
fi
robustprune gate "$run_dir/report.json" --recipe "$recipe" --policy "$here/policy.yaml" \
  --baseline "$baseline" --junit "$run_dir/gates.junit.xml" ${extra[@]+"${extra[@]}"}
