#!/usr/bin/env bash
# Set up, then run a one-machine cluster: a head and 2 local worker nodes.
# Prints /status once it serves, then drains and stops. Pass --stay to keep it up.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
exec .venv/bin/python -m controller.surface.quickstart "$@"
