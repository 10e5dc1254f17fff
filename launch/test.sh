#!/usr/bin/env bash
# The test suite on a fresh machine: install everything (Horovod included), lint, run pytest.
# Components are real: DALI (CPU pipelines), MPI (mpirun), Horovod (horovodrun --gloo) must be present.
# Slurm tests submit the real slurm/*.sh scripts; in CI (CI=true) or with PHOTOZ_WITH_SLURM=1 this
# script starts a single-node cluster (root, Debian) and the tests require it; otherwise they skip.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh --with-horovod
PY=${PYTHON:-python3}
export PHOTOZ_REQUIRE_HOROVOD=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
if [[ "${CI:-}" == "true" || "${PHOTOZ_WITH_SLURM:-0}" == "1" ]]; then
  bash launch/start_slurm.sh
  export PHOTOZ_REQUIRE_SLURM=1
fi
# Lint the Slurm and launch scripts with Debian's shellcheck (tests/test_slurm_workflow.py); in CI it must be there.
if ! command -v shellcheck >/dev/null 2>&1 && [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=300 update -qq && apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends shellcheck >/dev/null \
    || echo "test.sh: could not install shellcheck" >&2
fi
if [[ "${CI:-}" == "true" ]]; then export PHOTOZ_REQUIRE_SHELLCHECK=1; fi
"$PY" -m ruff check .
exec "$PY" -m pytest "$@"
