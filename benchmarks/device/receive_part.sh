#!/usr/bin/env bash
# On the device: keep one carried wheel part outside the working copy (STORE, default /root/photoz-dali, which
# stays while the machine is warm), and once every part named in the MANIFEST is there, check the sha256 sums,
# reassemble the wheel and install it (no network, no dependencies resolved: the carried ones in deps/) into
# STORE/site. benchmarks/gpu_check.sh puts STORE/site on PYTHONPATH when it holds nvidia/dali, after
# benchmarks/device/nvidia_ns (a regular nvidia package extending its path over every nvidia/ directory).
#
#   bash benchmarks/device/receive_part.sh PART_DIR     one part (e.g. .dali/part2); installs after the last
#   bash benchmarks/device/receive_part.sh --status     which parts are there
# Exit: 0 part stored (or installed and importable), 1 a checksum or the install failed, 2 usage.
set -uo pipefail
STORE=${STORE:-/root/photoz-dali}
PY=${PYTHON:-python3}
mkdir -p "$STORE/parts"
if [[ "${1:-}" != --status ]]; then
  PART=${1:?usage: receive_part.sh PART_DIR | --status}
  [[ -f "$PART/MANIFEST" ]] || { echo "receive_part.sh: $PART has no MANIFEST (was it carried?)" >&2; exit 2; }
  cp "$PART/MANIFEST" "$STORE/MANIFEST"
  for f in "$PART"/wheel.part*; do
    want=$(awk -v b="$(basename "$f")" '$1 == "part" && $3 == b {print $4}' "$STORE/MANIFEST")
    got=$(sha256sum "$f" | cut -d' ' -f1)
    [[ "$got" == "$want" ]] || { echo "receive_part.sh: $f: sha256 $got, MANIFEST says $want" >&2; exit 1; }
    cp "$f" "$STORE/parts/"
  done
  [[ -d "$PART/deps" ]] && mkdir -p "$STORE/deps" && cp "$PART"/deps/*.whl "$STORE/deps/"
fi
[[ -f "$STORE/MANIFEST" ]] || { echo "no part received yet"; exit 0; }
n=$(awk '$1 == "parts" {print $2}' "$STORE/MANIFEST")
have=$(ls "$STORE"/parts/wheel.part* 2>/dev/null | wc -l)
echo "parts: $have of $n in $STORE/parts"
[[ "${1:-}" == --status ]] && exit 0
(( have == n )) || exit 0
wheel="$STORE/$(awk '$1 == "wheel" {print $2}' "$STORE/MANIFEST")"
cat "$STORE"/parts/wheel.part* > "$wheel"
want=$(awk '$1 == "sha256" {print $2}' "$STORE/MANIFEST")
[[ "$(sha256sum "$wheel" | cut -d' ' -f1)" == "$want" ]] || { echo "receive_part.sh: reassembled wheel: bad sha256" >&2; exit 1; }
rm -rf "$STORE/site"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$STORE/site" "$wheel" \
  "$STORE"/deps/*.whl || { echo "receive_part.sh: pip install failed" >&2; exit 1; }
rm -f "$wheel" "$STORE"/parts/wheel.part*
# as benchmarks/gpu_check.sh imports it: nvidia_ns first (the image's regular nvidia package would hide DALI's)
NS="$(cd "$(dirname "$0")" && pwd)/nvidia_ns"
PYTHONPATH="$NS${PYTHONPATH:+:$PYTHONPATH}:$STORE/site" "$PY" -c \
  'import nvidia.dali as d, nvidia.dali.fn; print("DALI", d.__version__, "importable from", d.__file__)' \
  || { echo "receive_part.sh: installed, but nvidia.dali does not import" >&2; exit 1; }
