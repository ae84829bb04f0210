#!/usr/bin/env bash
# Set up (if needed) and run the tests on the CPU: the whole suite on the engine's Python, then the
# Slicer-side tests again on Python 3.12 without torch, their worker running on the engine's Python.
# --fast leaves out the tests marked slow (over ~5 s each); other arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MARK=()
ARGS=()
for arg in "$@"; do
    if [ "$arg" = "--fast" ]; then MARK=(-m "not slow"); else ARGS+=("$arg"); fi
done
# shellcheck disable=SC1091
. "$ROOT/Testing/setup_env.sh"
# shellcheck disable=SC1091
. "$ROOT/Testing/setup_slicer_env.sh"
cd "$ROOT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES-}"
echo "[tests] engine and Slicer side on $(python --version)"
python -m pytest -q -p no:cacheprovider ${MARK[@]+"${MARK[@]}"} Testing ${ARGS[@]+"${ARGS[@]}"}
if [ -n "$SLICER_PYTHON" ]; then
    echo "[tests] Slicer side on $("$SLICER_PYTHON" --version) (slicer-core 5.12, no torch; worker on $(python --version))"
    SAMFINETUNE_WORKER_PYTHON="$(command -v python)" PYTHONPATH="$ROOT" \
        "$SLICER_PYTHON" -m pytest -q -p no:cacheprovider ${MARK[@]+"${MARK[@]}"} Testing/test_slicer_*.py ${ARGS[@]+"${ARGS[@]}"}
fi
