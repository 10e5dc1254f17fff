#!/usr/bin/env bash
# Split a wheel (and the small wheels it needs) into parts that each fit one device call (the working tree
# plus carried paths travel in at most 64 MiB), under PARTS (default: the repository's .dali, a real directory,
# ignored by git and never committed), so that `carry: [".dali/partN"]` sends part N. A symbolic link to a
# directory outside the repository would not do: a carried path travels as what it is, and a link would arrive
# pointing at a directory the device machine does not have.
#
#   bash benchmarks/device/split_wheel.sh WHEEL [DEPS_DIR] [PART_MIB]
#     WHEEL     e.g. nvidia_dali_cuda130-2.4.0-py3-none-manylinux_2_28_x86_64.whl, fetched with
#               python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#                 --platform manylinux_2_28_x86_64 -d /tmp/photoz-dali nvidia-dali-cuda130==2.4.0
#     DEPS_DIR  wheels it needs that the device image lacks (astunparse gast libcst makefun nvtx optree); they go
#               with part 0
#     PART_MIB  default 48 (4 parts for the 190 MiB DALI wheel; at most 60)
# Writes PARTS/partN/wheel.partNN, PARTS/MANIFEST (wheel name, part count, sha256 of the wheel and of each part)
# copied into every part folder. benchmarks/device/receive_part.sh reassembles and installs on the device.
set -euo pipefail
WHEEL=${1:?usage: split_wheel.sh WHEEL [DEPS_DIR] [PART_MIB]}
DEPS=${2:-}
MIB=${3:-48}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PARTS=${PARTS:-$REPO/.dali}
(( MIB <= 60 )) || { echo "split_wheel.sh: parts of at most 60 MiB (got $MIB)" >&2; exit 2; }
[[ -f "$WHEEL" ]] || { echo "split_wheel.sh: no wheel at $WHEEL" >&2; exit 2; }
rm -rf "$PARTS"
mkdir -p "$PARTS/tmp"
split -b "${MIB}M" -d -a 2 "$WHEEL" "$PARTS/tmp/wheel.part"
n=0
for f in "$PARTS"/tmp/wheel.part*; do
  mkdir -p "$PARTS/part$n"
  mv "$f" "$PARTS/part$n/"
  n=$((n + 1))
done
rmdir "$PARTS/tmp"
if [[ -n "$DEPS" ]]; then
  mkdir -p "$PARTS/part0/deps"
  cp "$DEPS"/*.whl "$PARTS/part0/deps/"
fi
{
  echo "wheel $(basename "$WHEEL")"
  echo "parts $n"
  echo "sha256 $(sha256sum "$WHEEL" | cut -d' ' -f1)"
  for ((i = 0; i < n; i++)); do
    f=$(ls "$PARTS/part$i"/wheel.part*)
    echo "part $i $(basename "$f") $(sha256sum "$f" | cut -d' ' -f1)"
  done
} > "$PARTS/MANIFEST"
for ((i = 0; i < n; i++)); do cp "$PARTS/MANIFEST" "$PARTS/part$i/"; done
grep -qx '/.dali' "$REPO/.gitignore" 2>/dev/null || echo "note: add /.dali to .gitignore" >&2
du -sh "$PARTS"/part* | sed 's/^/  /'
echo "$n parts under $PARTS; send each with carry [\".dali/partN\"] and"
echo "  bash benchmarks/device/receive_part.sh .dali/partN"
