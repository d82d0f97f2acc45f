#!/usr/bin/env bash
# The chaos run: every fault of the matrix (the tests marked `chaos`), RUNS times
# in a row (default 3); it stops at the first failing run. Then a summary of the
# figures each fault recorded: faults injected, requests sent, failed and lost,
# detection and recovery times. (Regular CI runs each of these tests once.)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
RUNS="${RUNS:-3}"
report="${CHAOS_REPORT:-bench/results/chaos.jsonl}"
mkdir -p "$(dirname "$report")"
: > "$report"
for i in $(seq 1 "$RUNS"); do
    echo "chaos: run $i of $RUNS" >&2
    if ! CHAOS_REPORT="$report" CHAOS_RUN="$i" .venv/bin/python -m pytest -m chaos -q -p no:cacheprovider "$@" tests; then
        echo "chaos: run $i of $RUNS failed" >&2
        exit 1
    fi
done
.venv/bin/python scripts/chaos_summary.py "$report"
