#!/usr/bin/env bash
# Creates .venv-slicer (once) with Python 3.12, as Slicer 5.10 and 5.12 ship, for the Slicer-side
# tests (Testing/requirements-slicer.txt). Sourced by run_tests.sh; sets SLICER_PYTHON, or leaves
# it empty (with a note) where no Python 3.12 is found.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SLICER_VENV="${SAMFINETUNE_SLICER_VENV:-$ROOT/.venv-slicer}"
SLICER_PYTHON=""
PYTHON312=""
for candidate in ${PYTHON312_CANDIDATE:-} python3.12 "$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"/versions/3.12.*/bin/python; do
    if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
        PYTHON312="$candidate"
        break
    fi
done
if [ -z "$PYTHON312" ]; then
    echo "[setup] no Python 3.12 found (set PYTHON312_CANDIDATE): the Slicer-side tests run on this Python only"
    return 0 2>/dev/null || exit 0
fi
if [ ! -x "$SLICER_VENV/bin/python" ]; then
    echo "[setup] creating $SLICER_VENV with $("$PYTHON312" --version) for the Slicer-side tests"
    "$PYTHON312" -m venv "$SLICER_VENV"
fi
STAMP="$SLICER_VENV/.samfinetune-installed"
REQUIREMENTS="$ROOT/Testing/requirements-slicer.txt"
if [ ! -f "$STAMP" ] || [ "$REQUIREMENTS" -nt "$STAMP" ]; then
    echo "[setup] installing slicer-core 5.12 and the Slicer-side test tools into $SLICER_VENV"
    "$SLICER_VENV/bin/python" -m pip install --quiet --upgrade pip
    "$SLICER_VENV/bin/python" -m pip install --quiet -r "$REQUIREMENTS"
    touch "$STAMP"
fi
SLICER_PYTHON="$SLICER_VENV/bin/python"
