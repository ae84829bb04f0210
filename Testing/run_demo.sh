#!/usr/bin/env bash
# Set up (if needed) and run the demo: segment a synthetic CT with LiteMedSAM, then fine-tune on it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/Testing/setup_env.sh"
cd "$ROOT"
python -m SAMFineTuneLib demo --output "${1:-$ROOT/demo_output}"
