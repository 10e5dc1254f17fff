#!/usr/bin/env bash
# The prepared GPU check: one short script for one H100/H200, which exits 1 when a step fails or a component it
# needs is missing, and prints a small table last. Every step has a time limit (LIMIT below, capped by what is left
# of BUDGET_S = 300 s); the limits sum to the budget, so no step is cut because an earlier one ran long, and the
# whole device plan (start-up, transfers, this check, one rerun) fits 15 minutes of device time (docs/benchmarks.md).
# Nothing is downloaded: the device image has torch, numpy, h5py, pyyaml, tqdm, tensorboard and pytest (no
# matplotlib: the tests that draw skip); photoz_hpc comes from this checkout via PYTHONPATH. NVIDIA DALI and
# Horovod are not on that image: their steps are reported "not run: ... missing" and fail the check only with
# --require-dali / --require-horovod. A DALI wheel brought over in parts (benchmarks/device/, docs/benchmarks.md)
# and installed into $PHOTOZ_DALI_SITE (/root/photoz-dali/site) is used, with benchmarks/device/nvidia_ns first on
# PYTHONPATH (the image's regular nvidia/__init__.py would otherwise hide DALI's nvidia/dali).
#
# Steps, most important first (limit in s):
#   env            15  GPU, driver, torch/CUDA, native bf16, DALI/Horovod (no CUDA device: fail, nothing else runs)
#   store          30  the store of 8192 cutouts the later steps read (reused while the machine is warm; a build
#                      killed midway is removed and built again)
#   gpu_tests      55  pytest tests/test_gpu_paths.py on the GPU: crashes and wrong results of the CUDA-only paths
#   split_bn       30  split BatchNorm on channels_last activations: eager and fused (torch.compile) backwards vs
#                      the NCHW copy; prints the moco.split_bn_backward to use (docs/training.md); compiles the
#                      fused backward the training runs use (auto = fused on a GPU)
#   pretrain_bf16  45  MoCo ResNet-50, per-GPU batch 256, 64x64, bf16 + channels_last, 40 steps: img/s end to end
#                      and compute-only (step time minus data wait; the reference loader limits the former)
#   loader         20  GPU loader throughput: reference, and DALI when present (goal >= 40,000 two-view samples/s)
#   pretrain_fp16  25  the same as pretrain_bf16 with fp16 + GradScaler, 20 steps
#   dali_tests     25  augment tests on the DALI GPU path (PHOTOZ_AUGMENT_DEVICE=gpu)                     [DALI]
#   pretrain_dali  20  bf16 with the DALI GPU loader, 20 steps                                             [DALI]
#   torchrun_nccl  20  torchrun --standalone --nproc_per_node 1 ... dist.backend=torch (NCCL, DDP), 10 steps
#   horovod        15  1-rank Horovod with the GPU defaults of configs/pretrain.yaml (channels_last, bf16) [Horovod]
# Every run trains afresh (a new run directory, train.resume=never), so a rerun on a warm machine measures again.
#
# Usage: bash benchmarks/gpu_check.sh [--require-dali] [--require-horovod] [--dry-run] [OUT_DIR]
#   OUT_DIR (default /tmp/photoz-gpu-check): every step's full log, the summaries (JSON) and table.txt.
#   WORK (default /tmp/photoz-gpu-work): data and run directories. PYTHON picks the interpreter (python3).
#   --dry-run: print the steps and their time limits, run nothing (the component checks still run).
# With the device tool (at most 8 files come back from $OUT), bundle the output directory, e.g.
#   bash benchmarks/gpu_check.sh /tmp/gc; rc=$?; tar czf "$OUT/gpu_check.tgz" -C /tmp gc; exit $rc
set -uo pipefail
cd "$(dirname "$0")/.."

REQUIRE_DALI=0 REQUIRE_HVD=0 DRY=0 OUT_DIR=""
for arg in "$@"; do
  case "$arg" in
    --require-dali) REQUIRE_DALI=1 ;;
    --require-horovod) REQUIRE_HVD=1 ;;
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,36p' "$0"; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $arg" >&2; exit 2 ;;
    *) OUT_DIR="$arg" ;;
  esac
done
OUT_DIR="${OUT_DIR:-/tmp/photoz-gpu-check}"
WORK="${WORK:-/tmp/photoz-gpu-work}"
PY="${PYTHON:-python3}"
BUDGET_S=300
# the limit of every step (seconds): they sum to BUDGET_S (tests/test_gpu_check.py)
declare -A LIMIT=([env]=15 [store]=30 [gpu_tests]=55 [split_bn]=30 [pretrain_bf16]=45 [loader]=20 [pretrain_fp16]=25
  [dali_tests]=25 [pretrain_dali]=20 [torchrun_nccl]=20 [horovod]=15)
STEPS=(env store gpu_tests split_bn pretrain_bf16 loader pretrain_fp16 dali_tests pretrain_dali torchrun_nccl horovod)
mkdir -p "$OUT_DIR" "$WORK"
rm -f "$OUT_DIR"/*.log "$OUT_DIR"/*.json "$OUT_DIR"/table.txt
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# DALI for CUDA 13 carried over in parts and installed by benchmarks/device/receive_part.sh (docs/benchmarks.md)
# into its own directory; nvidia_ns goes first so that nvidia.dali imports beside the image's regular nvidia package
DALI_SITE="${PHOTOZ_DALI_SITE:-/root/photoz-dali/site}"
if [[ -d "$DALI_SITE/nvidia/dali" ]]; then
  export PYTHONPATH="$PWD/benchmarks/device/nvidia_ns:$PYTHONPATH:$DALI_SITE"
  echo "DALI: using $DALI_SITE"
fi
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1  # the device machine runs as root (horovodrun)
START=$SECONDS
ROWS=()
FAILED=0
DATA="$WORK/bench-8192-107"  # written by the store step (benchmarks/pipeline_throughput.py --store-only)

row() {  # NAME STATUS SECONDS DETAIL
  ROWS+=("$(printf '%-14s %-8s %5s  %s' "$1" "$2" "$3" "$4")")
  [[ "$2" == FAIL ]] && FAILED=1
  printf '== %-14s %-8s %5s  %s\n' "$1" "$2" "$3" "$4"
}

# run NAME CMD...: CMD with its time limit LIMIT[NAME] (capped by what is left of the budget), its full output in
# OUT_DIR/NAME.log. Returns its exit status (124: over the limit, 125: no time left); sets DUR.
run() {
  local name=$1 limit=${LIMIT[$1]}
  shift
  DUR=0
  if (( DRY )); then
    printf '[dry-run] %-14s limit %3d s: %s\n' "$name" "$limit" "$*"
    row "$name" dry-run - "limit $limit s"
    return 0
  fi
  local left=$(( BUDGET_S - (SECONDS - START) ))
  (( limit > left )) && limit=$left
  if (( limit < 5 )); then
    echo "not run: the check's time budget ($BUDGET_S s) is spent" > "$OUT_DIR/$name.log"
    return 125
  fi
  local t0=$SECONDS rc
  timeout -k 10 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  rc=$?
  DUR=$(( SECONDS - t0 ))
  if (( rc != 0 )); then
    echo "-- $name: exit $rc after $DUR s (limit $limit s); end of $OUT_DIR/$name.log:"
    tail -n 12 "$OUT_DIR/$name.log"
  fi
  return $rc
}

why() {  # a failed step's exit status in words
  case "$1" in 124|137) echo "time limit" ;; 125) echo "not run: time budget spent" ;; *) echo "exit $1" ;; esac
}

missing() {  # NAME COMPONENT REQUIRED
  if (( $3 )); then row "$1" FAIL - "$2 missing (required by --require-${2,,})"
  else row "$1" skip - "not run: $2 missing"; fi
}

# pretrain NAME STEPS EXPECT(k=v,...) OVERRIDE...: one fresh MoCo run on the GPU
pretrain() {
  local name=$1 steps=$2 expect=$3
  shift 3
  local dir="$WORK/runs/$name" rc detail launcher=("$PY" -m photoz_hpc)
  [[ "$name" == torchrun_nccl ]] && launcher=("$PY" -m torch.distributed.run --standalone --nproc_per_node 1 -m photoz_hpc)
  if [[ "$name" == horovod ]] && command -v horovodrun >/dev/null; then
    launcher=(horovodrun -np 1 -H localhost:1 "$PY" -m photoz_hpc)
  fi
  (( DRY )) || rm -rf "$dir"
  if [[ ! -f "$DATA/manifest.json" ]] && (( ! DRY )); then row "$name" FAIL - "not run: no data (store step failed)"; return; fi
  run "$name" "${launcher[@]}" pretrain --config configs/pretrain.yaml "data.path=$DATA" "out_dir=$dir" \
    train.resume=never "train.max_steps=$steps" train.progress=false train.tensorboard=false \
    train.checkpoint_every=100000 train.log_every=10 loader.batch_size=256 loader.device=gpu \
    loader.backend=reference loader.num_workers=4 loader.verify_records=false moco.queue_size=4096 "$@"
  rc=$?
  (( DRY )) && return
  cp "$dir/summary.json" "$OUT_DIR/$name.json" 2>/dev/null
  if (( rc != 0 )); then row "$name" FAIL "$DUR" "$(why $rc) (log: $name.log)"; return; fi
  # shellcheck disable=SC2086
  if detail=$("$PY" benchmarks/gpu_check_report.py pretrain "$OUT_DIR/$name.json" "$steps" ${expect//,/ } 2>&1); then
    row "$name" ok "$DUR" "$(echo "$detail" | head -n 1)"
  else
    row "$name" FAIL "$DUR" "$(echo "$detail" | tail -n 1)"
  fi
}

# ---------------------------------------------------------------------------------------------------- steps
HAVE_DALI=0 HAVE_HVD=0
if dali_from=$("$PY" -c 'import nvidia.dali as d; print(d.__file__)' 2>/dev/null); then
  HAVE_DALI=1
  echo "DALI: nvidia.dali from $dali_from"
fi
"$PY" -c 'import horovod.torch' >/dev/null 2>&1 && HAVE_HVD=1
total=0
for s in "${STEPS[@]}"; do total=$(( total + LIMIT[$s] )); done
echo "plan: ${#STEPS[@]} steps, limits sum to $total s, budget $BUDGET_S s"

# a test step: pytest's last summary line, FAIL when the CUDA tests were skipped (no GPU after all)
test_row() {  # NAME RC
  local last
  last=$(grep -E '(passed|failed|error|skipped)' "$OUT_DIR/$1.log" | tail -n 1)
  if (( $2 == 0 )) && grep -q "needs a CUDA GPU" "$OUT_DIR/$1.log"; then
    row "$1" FAIL "$DUR" "the CUDA tests were skipped: $last"
  elif (( $2 == 0 )); then row "$1" ok "$DUR" "$last"
  else row "$1" FAIL "$DUR" "$(why "$2"): ${last:-see $1.log}"; fi
}

# a benchmark step: one line from gpu_check_report.py KIND JSON
bench_row() {  # NAME RC KIND
  if (( $2 == 0 )); then
    row "$1" ok "$DUR" "$("$PY" benchmarks/gpu_check_report.py "$3" "$OUT_DIR/$1.json" 2>&1)"
  else
    row "$1" FAIL "$DUR" "$(why "$2") (log: $1.log)"
  fi
}

run env bash -c 'date -Is; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true; exec "$@"' \
  env "$PY" benchmarks/gpu_check_report.py env "$OUT_DIR/env.json"
rc=$?
if (( DRY )); then
  :
elif (( rc != 0 )); then
  row env FAIL "$DUR" "$(tail -n 1 "$OUT_DIR/env.log") ($(why $rc); see env.log)"
else
  row env ok "$DUR" "$(tail -n 1 "$OUT_DIR/env.log")"
fi
echo "components: DALI $HAVE_DALI, Horovod $HAVE_HVD (1 = importable)"

if (( FAILED )); then
  for s in "${STEPS[@]:1}"; do row "$s" skip - "not run: env failed"; done
else
  # its own step, before anything needs it: a rerun on a warm machine reuses it, a half-built one is rebuilt
  run store "$PY" benchmarks/pipeline_throughput.py --store-only --work "$WORK" --n 8192
  rc=$?
  if (( ! DRY )); then
    if (( rc == 0 )) && [[ -f "$DATA/manifest.json" ]]; then row store ok "$DUR" "$DATA"
    else row store FAIL "$DUR" "$(why $rc) (log: store.log)"; fi
  fi

  run gpu_tests "$PY" -m pytest tests/test_gpu_paths.py -q -rs -p no:cacheprovider
  rc=$?
  (( DRY )) || test_row gpu_tests $rc

  run split_bn "$PY" benchmarks/split_bn.py --device cuda --dtype bf16 --json "$OUT_DIR/split_bn.json"
  rc=$?
  (( DRY )) || bench_row split_bn $rc split_bn

  pretrain pretrain_bf16 40 precision=bf16,memory_format=channels_last,backend=none train.precision=bf16 dist.backend=none

  if [[ ! -f "$DATA/manifest.json" ]] && (( ! DRY )); then
    row loader FAIL - "not run: no data (store step failed)"
  else
    run loader "$PY" benchmarks/pipeline_throughput.py --data "$DATA" --batch-size 256 --threads "$(nproc)" \
      --batches 20 --devices gpu --json "$OUT_DIR/loader.json"
    rc=$?
    (( DRY )) || bench_row loader $rc loader
  fi

  pretrain pretrain_fp16 20 precision=fp16,memory_format=channels_last train.precision=fp16 dist.backend=none \
    train.export_encoder=false

  if (( HAVE_DALI )); then
    PHOTOZ_AUGMENT_DEVICE=gpu run dali_tests "$PY" -m pytest tests/test_augment.py -q -rs -x -p no:cacheprovider
    rc=$?
    (( DRY )) || test_row dali_tests $rc
    pretrain pretrain_dali 20 precision=bf16 train.precision=bf16 dist.backend=none loader.backend=dali \
      train.export_encoder=false
  else
    missing dali_tests DALI "$REQUIRE_DALI"
    missing pretrain_dali DALI "$REQUIRE_DALI"
  fi

  pretrain torchrun_nccl 10 backend=torch,world_size=1 dist.backend=torch model.arch=resnet18 train.export_encoder=false
  if (( HAVE_HVD )); then
    pretrain horovod 10 backend=horovod,memory_format=channels_last,precision=bf16 dist.backend=horovod \
      train.export_encoder=false
  else
    missing horovod Horovod "$REQUIRE_HVD"
  fi
fi

# ---------------------------------------------------------------------------------------------------- table
{
  echo
  echo "GPU check, $(date -Is), $(( SECONDS - START )) s, full logs in $OUT_DIR"
  printf '%-14s %-8s %5s  %s\n' step result s detail
  printf '%s\n' "${ROWS[@]}"
  if (( FAILED )); then echo "RESULT: FAIL"; else echo "RESULT: ok"; fi
} | tee "$OUT_DIR/table.txt"
exit $FAILED
