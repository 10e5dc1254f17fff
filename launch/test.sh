#!/usr/bin/env bash
# The test suite on a fresh machine: install everything (Horovod included), lint, run pytest.
# Components are real: DALI (CPU), MPI (mpirun), Horovod (horovodrun --gloo) must all be present.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh --with-horovod
PY=${PYTHON:-python3}
export PHOTOZ_REQUIRE_HOROVOD=1 PHOTOZ_REQUIRE_DALI=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
"$PY" -m ruff check .
exec "$PY" -m pytest "$@"
