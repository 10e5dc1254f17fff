#!/usr/bin/env bash
# Build and install Horovod 0.28.1 (the last release) against the installed PyTorch.
#
# Why a wrapper compiler: Horovod 0.28.1's CMake overrides CXXFLAGS and compiles with C++14,
# but torch >= 2.1 headers need C++17 ("C++17 required"). Passing a CXX wrapper that appends
# -std=c++17 (the last -std flag wins) fixes it without vendoring or patching Horovod.
#
# Idempotent: exits immediately if `import horovod.torch` already works.
# Env: PYTHON (default python3), MAKEFLAGS (default -j$(nproc)), HOROVOD_VERSION (default 0.28.1).
set -euo pipefail

PYTHON="${PYTHON:-python3}"
HOROVOD_VERSION="${HOROVOD_VERSION:-0.28.1}"

if "$PYTHON" -c "import horovod.torch" >/dev/null 2>&1; then
    echo "install_horovod: horovod.torch already importable; nothing to do"
    "$PYTHON" -c "import horovod; print('horovod', horovod.__version__)"
    exit 0
fi

"$PYTHON" -c "import torch" || { echo "install_horovod: install torch first" >&2; exit 1; }
command -v cmake >/dev/null || { echo "install_horovod: cmake is required (apt-get install cmake)" >&2; exit 1; }
REAL_CXX="${CXX:-$(command -v g++ || command -v c++)}"
[ -n "$REAL_CXX" ] || { echo "install_horovod: no C++ compiler found (apt-get install g++)" >&2; exit 1; }

WRAPDIR="$(mktemp -d)"
trap 'rm -rf "$WRAPDIR"' EXIT
cat > "$WRAPDIR/cxx17" <<WRAP
#!/usr/bin/env bash
exec "$REAL_CXX" "\$@" -std=c++17
WRAP
chmod +x "$WRAPDIR/cxx17"

export CXX="$WRAPDIR/cxx17"
export MAKEFLAGS="${MAKEFLAGS:--j$(nproc)}"
export HOROVOD_WITH_PYTORCH=1
export HOROVOD_WITHOUT_TENSORFLOW=1
export HOROVOD_WITHOUT_MXNET=1
export HOROVOD_WITH_GLOO=1
# MPI: left to Horovod's CMake auto-detection (used when found, skipped otherwise);
# export HOROVOD_WITH_MPI=1 to make it mandatory.
if "$PYTHON" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() and torch.version.cuda else 1)" 2>/dev/null; then
    export HOROVOD_GPU_OPERATIONS="${HOROVOD_GPU_OPERATIONS:-NCCL}"
fi

echo "install_horovod: building horovod==$HOROVOD_VERSION with CXX wrapper ($REAL_CXX -std=c++17), MAKEFLAGS=$MAKEFLAGS"
"$PYTHON" -m pip install --no-build-isolation --no-cache-dir "horovod==$HOROVOD_VERSION"
"$PYTHON" -c "import horovod.torch as hvd; print('horovod', __import__('horovod').__version__, 'built OK')"
command -v horovodrun >/dev/null && horovodrun --check-build || true
