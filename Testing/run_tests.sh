#!/usr/bin/env bash
# Set up (if needed) and run the test suite on the CPU: all of it (what CI runs), or with --fast
# only the tests not marked slow (a few minutes on two cores). Other arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SELECT=()
ARGS=()
for arg in "$@"; do
  if [ "$arg" = "--fast" ]; then
    SELECT=(-m "not slow")
  else
    ARGS+=("$arg")
  fi
done
# shellcheck disable=SC1091
. "$ROOT/Testing/setup_env.sh"
cd "$ROOT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES-}"
python -m pytest -q -p no:cacheprovider ${SELECT[@]+"${SELECT[@]}"} Testing ${ARGS[@]+"${ARGS[@]}"}
