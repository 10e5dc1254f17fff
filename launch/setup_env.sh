#!/usr/bin/env bash
# Install photoz-hpc and everything it needs into the active Python (a venv if one is active).
# torch is pinned to 2.13.0: on a CPU box an unpinned torch pulls a multi-GB CUDA build.
# Usage: bash launch/setup_env.sh [--with-horovod]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
EXTRAS=${PHOTOZ_EXTRAS:-dali,mpi-wheel,sim,dev}

stamp=".setup-stamp"
want="$(sha256sum setup.py launch/setup_env.sh | sha256sum | cut -c1-16)-$TORCH_VERSION-$EXTRAS"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && "$PY" -c "import photoz_hpc, torch" 2>/dev/null; then
  echo "[setup] environment already installed ($want)"
else
  echo "[setup] installing torch==$TORCH_VERSION and photoz-hpc[$EXTRAS] into $("$PY" -c 'import sys; print(sys.prefix)')"
  "$PY" -m pip install --disable-pip-version-check -q "torch==$TORCH_VERSION"
  "$PY" -m pip install --disable-pip-version-check -q -e ".[$EXTRAS]" "torch==$TORCH_VERSION"
  echo "$want" > "$stamp"
fi
if [[ "${1:-}" == "--with-horovod" ]]; then
  bash launch/install_horovod.sh
fi
