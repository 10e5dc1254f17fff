#!/usr/bin/env bash
# The prepared GPU check (a few minutes on one H100/H200; run it with the `device` tool when a session
# is lent a machine). Nothing is downloaded: the device image has torch, numpy, h5py, pyyaml, tqdm and
# tensorboard; photoz_hpc comes from this checkout via PYTHONPATH. NVIDIA DALI is not on that image and
# its wheel (~0.4 GB) exceeds what can be carried there, so the DALI GPU steps run only where
# `import nvidia.dali` works; otherwise they are reported as not run.
#   1. environment record (GPU, torch, DALI),
#   2. augment tests on the GPU path (PHOTOZ_AUGMENT_DEVICE=gpu; needs DALI),
#   3. loader throughput: reference (torch on GPU) and DALI GPU when present (goal >= 40,000 two-view/s),
#   4. MoCo pretraining steps on the GPU: ResNet-50, batch 256, 64x64, bf16 autocast + channels_last,
#      then fp16 + GradScaler; img/s from summary.json (goal: data never limits ~5,000 img/s/GPU).
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-/tmp/photoz-gpu-check}}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
{
  date -Is; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'
  "$PY" -c 'import nvidia.dali as d; print("dali", d.__version__)' 2>/dev/null || echo "dali: not installed"
} 2>&1 | tee "$OUT/env.txt"

if "$PY" -c 'import nvidia.dali' 2>/dev/null; then
  PHOTOZ_AUGMENT_DEVICE=gpu timeout 300 "$PY" -m pytest tests/test_augment.py -q -x -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.txt"
else
  echo "augment GPU tests not run: DALI missing" | tee "$OUT/gpu_tests.txt"
fi

timeout 300 "$PY" benchmarks/pipeline_throughput.py --work /tmp/photoz-bench --n 8192 --batch-size 256 \
  --threads "$(nproc)" --batches 30 --devices auto --json "$OUT/throughput.json" 2>&1 | tee "$OUT/throughput.txt"

DATA=/tmp/photoz-bench/bench-8192-107   # made by the benchmark above
for prec in bf16 fp16; do
  timeout 240 "$PY" -m photoz_hpc pretrain --config configs/pretrain.yaml "data.path=$DATA" \
    "out_dir=/tmp/photoz-gpu-$prec" train.max_steps=60 train.progress=false train.precision=$prec \
    loader.batch_size=256 loader.device=gpu moco.queue_size=4096 train.checkpoint_every=1000 \
    2>&1 | tail -n 5 | tee "$OUT/pretrain_$prec.txt"
  cp "/tmp/photoz-gpu-$prec/summary.json" "$OUT/pretrain_$prec.json" 2>/dev/null || true
done
