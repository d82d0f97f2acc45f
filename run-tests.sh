#!/usr/bin/env bash
# Set up, then run the whole test suite (unit, CLI and real-cluster integration).
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
set +e
.venv/bin/python -m pytest "$@"
code=$?
set -e
if [ "$code" -eq 5 ]; then
    echo "run-tests: error: pytest collected no tests" >&2
fi
exit "$code"
