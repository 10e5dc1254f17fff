#!/bin/bash
# Training throughput of MoCo pretraining (benchmarks/train_throughput.py) at 1, 2, 4, ... nodes: weak scaling
# (fixed batch per rank) or strong scaling (fixed global batch), either backend; one job per size, then a merge
# job writing the table with benchmarks/scaling.py report.
#   bash slurm/benchmark_scaling.sh --submit 1 2 4 8                  # from a login node: jobs at 1, 2, 4, 8 nodes
#   PHOTOZ_SCALING=strong PHOTOZ_BACKEND=horovod bash slurm/benchmark_scaling.sh --submit 1 2 4 -- model.width=32
#   bash slurm/benchmark_scaling.sh --merge runs/scaling              # the table again, from the JSONs there
# Each job runs train_throughput.py --json on every rank under srun: PHOTOZ_WARMUP steps, then PHOTOZ_WINDOWS timed
# windows of PHOTOZ_WINDOW_STEPS steps, in PHOTOZ_THROUGHPUT_MODE (default end2end, the real loader, when PHOTOZ_DATA
# is given, else synthetic, compute only), and writes PHOTOZ_SCALING_DIR/<kind>-<backend>-<queue>-n<ranks>.json
# (its launch record: logs/<that name>/launch.log). Efficiency is against the 1-rank run: --submit adds a 1-rank
# job where no size gives one (PHOTOZ_SCALING_UNIT=nodes, or tasks without 1). The merge job writes
# scaling-<kind>.md, .png and .json there. PHOTOZ_SCALING_UNIT=tasks scales ranks on one node instead of nodes.
# Arguments after -- (or, under sbatch, all arguments) are config overrides. Extra sbatch options:
# PHOTOZ_SCALING_SBATCH. Other variables as in slurm/pretrain.sh (PHOTOZ_CONFIG, PHOTOZ_DATA, PHOTOZ_SITE,
# PHOTOZ_SRUN_MPI, PHOTOZ_STAGE, ...).
#SBATCH --job-name=photoz-scaling
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=00:30:00
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail
if [[ -n ${SLURM_JOB_ID:-} ]]; then cd "${SLURM_SUBMIT_DIR:?}"; else cd "$(dirname "$0")/.."; fi
source slurm/common.sh

: "${PHOTOZ_SCALING:=weak}"                        # weak: PHOTOZ_BATCH per rank; strong: PHOTOZ_GLOBAL_BATCH in all
: "${PHOTOZ_BACKEND:=auto}"                        # dist.backend: auto | torch | horovod
: "${PHOTOZ_QUEUE_MODE:=sharded}"                  # moco.queue_mode: sharded | local | replicated
: "${PHOTOZ_SCALING_DIR:=runs/scaling}"
: "${PHOTOZ_SCALING_UNIT:=nodes}"                  # nodes | tasks (ranks on one node)
: "${PHOTOZ_BATCH:=128}"
: "${PHOTOZ_GLOBAL_BATCH:=1024}"
: "${PHOTOZ_CONFIG:=configs/pretrain.yaml}"
: "${PHOTOZ_DATA:=}"                               # a prepared dataset (else synthetic batches, no loader)
if [[ -n $PHOTOZ_DATA ]]; then : "${PHOTOZ_THROUGHPUT_MODE:=end2end}"; else : "${PHOTOZ_THROUGHPUT_MODE:=synthetic}"; fi
: "${PHOTOZ_WARMUP:=5}" "${PHOTOZ_WINDOWS:=5}" "${PHOTOZ_WINDOW_STEPS:=10}"

# Every setting checked before anything is submitted or launched.
check_settings() {
  [[ -z ${PHOTOZ_STEPS:-} ]] || photoz_die "PHOTOZ_STEPS is gone: set PHOTOZ_WARMUP, PHOTOZ_WINDOWS and PHOTOZ_WINDOW_STEPS"
  [[ $PHOTOZ_SCALING == weak || $PHOTOZ_SCALING == strong ]] || photoz_die "PHOTOZ_SCALING must be weak or strong, got '$PHOTOZ_SCALING'"
  [[ $PHOTOZ_SCALING_UNIT == nodes || $PHOTOZ_SCALING_UNIT == tasks ]] || photoz_die "PHOTOZ_SCALING_UNIT must be nodes or tasks, got '$PHOTOZ_SCALING_UNIT'"
  local var mode modes
  for var in PHOTOZ_BATCH PHOTOZ_GLOBAL_BATCH PHOTOZ_WARMUP PHOTOZ_WINDOWS PHOTOZ_WINDOW_STEPS; do
    [[ ${!var} =~ ^[0-9]+$ ]] || photoz_die "$var must be a non-negative integer, got '${!var}'"
  done
  (( PHOTOZ_WINDOWS > 0 && PHOTOZ_WINDOW_STEPS > 0 )) || photoz_die "PHOTOZ_WINDOWS and PHOTOZ_WINDOW_STEPS must be positive"
  IFS=, read -r -a modes <<< "$PHOTOZ_THROUGHPUT_MODE"
  for mode in "${modes[@]}"; do
    case $mode in
      synthetic) ;;
      end2end|pipeline) [[ -n $PHOTOZ_DATA ]] || photoz_die "PHOTOZ_THROUGHPUT_MODE=$mode reads the dataset: set PHOTOZ_DATA" ;;
      *) photoz_die "PHOTOZ_THROUGHPUT_MODE: unknown mode '$mode' (synthetic, end2end, pipeline; comma-separated)" ;;
    esac
  done
  [[ -f $PHOTOZ_CONFIG ]] || photoz_die "PHOTOZ_CONFIG: config $PHOTOZ_CONFIG not found"
  if [[ -n $PHOTOZ_DATA ]]; then photoz_require_dataset "$PHOTOZ_DATA" PHOTOZ_DATA; fi
}

# The table of one kind from the JSONs in $1: scaling-<kind>.md, .png, .json.
merge() {
  local dir=$1 kind=$PHOTOZ_SCALING
  local files=("$dir/$kind"-*-n*.json)
  [[ -f ${files[0]} ]] || photoz_die "no $kind-scaling results in $dir ($kind-*-n*.json): see the jobs' output and $dir/logs/*/launch.log"
  "$PYTHON" benchmarks/scaling.py report "${files[@]}" \
    --table "$dir/scaling-$kind.md" --plot "$dir/scaling-$kind.png" --json "$dir/scaling-$kind.json"
  echo "table: $dir/scaling-$kind.md"
}

# sbatch one measurement job: submit_job LABEL SBATCH_SIZE_OPTIONS...; appends its id to $ids.
submit_job() {
  local label=$1 id
  shift
  id=$(sbatch --parsable "${site_opts[@]}" "${own_opts[@]}" "$@" slurm/benchmark_scaling.sh "${overrides[@]}") \
    || photoz_die "sbatch of the $label job failed"
  ids+=("${id%%;*}")
  echo "$label: job ${id%%;*}"
}

if [[ ${1:-} == --merge ]]; then
  photoz_load_site
  : "${PYTHON:=python3}"
  merge "${2:-$PHOTOZ_SCALING_DIR}"
  exit
fi

if [[ ${1:-} == --submit ]]; then                  # login node: one job per size, then the merge
  shift
  sizes=()
  while [[ $# -gt 0 && $1 != -- ]]; do sizes+=("$1"); shift; done
  [[ ${1:-} == -- ]] && shift
  overrides=("$@")
  [[ ${#sizes[@]} -gt 0 ]] || photoz_die "usage: bash slurm/benchmark_scaling.sh --submit N1 N2 ... [-- key=value ...] (nodes, or ranks with PHOTOZ_SCALING_UNIT=tasks)"
  for n in "${sizes[@]}"; do [[ $n =~ ^[1-9][0-9]*$ ]] || photoz_die "sizes must be positive integers, got '$n'"; done
  photoz_load_site
  : "${PYTHON:=python3}"
  check_settings
  photoz_check_config "$PHOTOZ_CONFIG" "dist.backend=$PHOTOZ_BACKEND" "moco.queue_mode=$PHOTOZ_QUEUE_MODE" "${overrides[@]}"
  read -r -a site_opts <<< "${PHOTOZ_SBATCH_ARGS:-}"
  read -r -a own_opts <<< "${PHOTOZ_SCALING_SBATCH:-}"   # e.g. "--time=00:10:00 --partition=gpu"
  ids=()
  if [[ $PHOTOZ_SCALING_UNIT == nodes || ! " ${sizes[*]} " =~ " 1 " ]]; then
    submit_job "1 rank (the efficiency baseline)" --nodes=1 --ntasks-per-node=1
  fi
  for n in "${sizes[@]}"; do
    if [[ $PHOTOZ_SCALING_UNIT == nodes ]]; then
      submit_job "$n nodes" --nodes="$n"
    else
      submit_job "$n ranks" --nodes=1 --ntasks-per-node="$n"
    fi
  done
  deps=$(IFS=:; echo "${ids[*]}")
  printf -v wrap '%q ' bash slurm/benchmark_scaling.sh --merge "$PHOTOZ_SCALING_DIR"
  id=$(sbatch --parsable "${site_opts[@]}" --dependency="afterany:$deps" --nodes=1 --ntasks=1 --ntasks-per-node=1 \
    --gpus-per-node=0 "${own_opts[@]}" --wrap "$wrap") || photoz_die "sbatch of the merge job failed"
  echo "merge: job ${id%%;*} -> $PHOTOZ_SCALING_DIR/scaling-$PHOTOZ_SCALING.md"
  exit 0
fi

[[ -n ${SLURM_JOB_ID:-} ]] || photoz_die "run with --submit N..., --merge DIR, or under sbatch"
photoz_setup
check_settings
ranks=${SLURM_NTASKS:-1}
if [[ $PHOTOZ_SCALING == weak ]]; then batch=$PHOTOZ_BATCH; else
  (( PHOTOZ_GLOBAL_BATCH % ranks == 0 )) || photoz_die "PHOTOZ_GLOBAL_BATCH=$PHOTOZ_GLOBAL_BATCH does not split over $ranks ranks"
  batch=$((PHOTOZ_GLOBAL_BATCH / ranks))
fi
name=$PHOTOZ_SCALING-$PHOTOZ_BACKEND-$PHOTOZ_QUEUE_MODE-n$ranks
json=$PHOTOZ_SCALING_DIR/$name.json
logdir=$PHOTOZ_SCALING_DIR/logs/$name
overrides=("dist.backend=$PHOTOZ_BACKEND" "moco.queue_mode=$PHOTOZ_QUEUE_MODE" "loader.batch_size=$batch" "$@")
photoz_check_config "$PHOTOZ_CONFIG" "${overrides[@]}"
if [[ -n $PHOTOZ_DATA ]]; then photoz_stage PHOTOZ_DATA "$PHOTOZ_CONFIG" "${overrides[@]}"; fi   # PHOTOZ_STAGE=1: node-local copies
bench=(--config "$PHOTOZ_CONFIG" --modes "$PHOTOZ_THROUGHPUT_MODE" --warmup "$PHOTOZ_WARMUP" --windows "$PHOTOZ_WINDOWS"
       --window-steps "$PHOTOZ_WINDOW_STEPS" --json "$json")
if [[ -n $PHOTOZ_DATA ]]; then bench+=(--data "$PHOTOZ_DATA"); fi
rm -f "$json"                                      # a fresh measurement: no JSON of an earlier job is merged
photoz_record "$logdir"
photoz_srun "$logdir" "$PYTHON" benchmarks/train_throughput.py "${bench[@]}" "${overrides[@]}"
if [[ $rc -eq 0 && ! -s $json ]]; then photoz_log "the ranks exited 0 but wrote no $json"; rc=1; fi
echo "== $(date -Is) exit code $rc" >> "$logdir/launch.log"
photoz_unstage
if [[ $rc -eq 0 ]]; then echo "wrote $json"; fi
exit "$rc"
