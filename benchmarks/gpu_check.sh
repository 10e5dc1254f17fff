#!/usr/bin/env bash
# GPU check of the augmentation loaders (a few minutes on one H100/H200):
#   1. install the package (and DALI for CUDA 12 if missing),
#   2. run the augment tests with the GPU device (PHOTOZ_AUGMENT_DEVICE=gpu: DALI GPU vs reference on GPU),
#   3. run the throughput benchmark on CPU and GPU (goal: >= 40,000 two-view samples/s on one H100).
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]     (writes OUT_DIR/gpu_tests.txt, OUT_DIR/throughput.json)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-/tmp/photoz-gpu-check}}"
mkdir -p "$OUT"
python -c "import nvidia.dali" 2>/dev/null || pip install -q nvidia-dali-cuda120
pip install -q -e . 2>/dev/null || true
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
PHOTOZ_AUGMENT_DEVICE=gpu timeout 300 python -m pytest tests/test_augment.py -q -x -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.txt"
timeout 300 python benchmarks/pipeline_throughput.py --n 8192 --batch-size 256 --threads "$(nproc)" --batches 30 \
    --devices auto --json "$OUT/throughput.json" 2>&1 | tee "$OUT/throughput.txt"
