#!/usr/bin/env bash
# Run a pytest selection N times under CPU pressure and count the runs that failed:
#   scripts/test_loop.sh N PYTEST_ARGS...
#   e.g. scripts/test_loop.sh 20 tests/optim/test_worker.py -k "outage or killed"
# Pressure: the tests and every process they start run on CPU 0 only (taskset), which a busy
# loop shares with them (also on CPU 0); the other CPUs stay free. Each run's output goes to
# $LOOP_DIR/run-K.log (default: a new temporary folder); one line per run, then a total.
# SLURM jobs are started by slurmd, not by the tests: they are not pinned.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "$#" -lt 2 ] || ! [[ "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: scripts/test_loop.sh N PYTEST_ARGS..." >&2
  exit 2
fi
runs=$1; shift
dir=${LOOP_DIR:-$(mktemp -d -t test-loop-XXXXXX)}
mkdir -p "$dir"
taskset -c 0 .venv/bin/python -c "while True: pass" &
busy=$!
trap 'kill "$busy" 2>/dev/null' EXIT
failed=0
for ((k = 1; k <= runs; k++)); do
  began=$(date +%s)
  if OMP_NUM_THREADS=1 taskset -c 0 .venv/bin/python -m pytest -q -p no:cacheprovider "$@" \
      >"$dir/run-$k.log" 2>&1; then
    result=passed
  else
    result=FAILED; failed=$((failed + 1))
  fi
  echo "run $k/$runs: $result in $(( $(date +%s) - began )) s ($(tail -n 1 "$dir/run-$k.log"))"
done
echo "$failed of $runs runs failed (logs in $dir)"
[ "$failed" -eq 0 ]
