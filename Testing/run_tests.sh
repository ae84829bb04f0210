#!/usr/bin/env bash
# Set up (if needed) and run the tests on the CPU: the engine's on the engine's Python, then the
# Slicer-side tests (test_slicer_*.py) on Python 3.12 without torch, their worker running on the
# engine's Python. The engine's pass runs the Slicer-side tests that need torch in Slicer's process,
# and all of them where no Python 3.12 was found. --fast leaves out the tests marked slow (over ~5 s
# each); other arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FAST=""
ARGS=()
for arg in "$@"; do
    if [ "$arg" = "--fast" ]; then FAST="not slow"; else ARGS+=("$arg"); fi
done
# shellcheck disable=SC1091
. "$ROOT/Testing/setup_env.sh"
# shellcheck disable=SC1091
. "$ROOT/Testing/setup_slicer_env.sh"
cd "$ROOT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES-}"
ENGINE_PASS="$FAST"
if [ -n "$SLICER_PYTHON" ]; then
    ENGINE_PASS="${FAST:+$FAST and }(not slicer_side or in_process)"
    echo "[tests] engine, and the Slicer side in Slicer's process, on $(python --version)"
else
    echo "[tests] engine and Slicer side on $(python --version)"
fi
python -m pytest -q -p no:cacheprovider ${ENGINE_PASS:+-m "$ENGINE_PASS"} Testing ${ARGS[@]+"${ARGS[@]}"}
if [ -n "$SLICER_PYTHON" ]; then
    echo "[tests] Slicer side on $("$SLICER_PYTHON" --version) (slicer-core 5.12, no torch; worker on $(python --version))"
    SAMFINETUNE_WORKER_PYTHON="$(command -v python)" PYTHONPATH="$ROOT" \
        "$SLICER_PYTHON" -m pytest -q -p no:cacheprovider ${FAST:+-m "$FAST"} Testing/test_slicer_*.py ${ARGS[@]+"${ARGS[@]}"}
fi
