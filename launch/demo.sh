#!/usr/bin/env bash
# The main job on a fresh machine: install, then run the demo (synthetic survey, CPU).
# Extra arguments are passed to `photoz-hpc demo` (e.g. --fresh, train.epochs=1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
exec "${PYTHON:-python3}" -m photoz_hpc demo "$@"
