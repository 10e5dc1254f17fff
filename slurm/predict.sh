#!/bin/bash
# Survey-scale inference: the photo-z catalogue of many prepared datasets. One Slurm array task per
# contiguous block of input shards, each task one rank per GPU (srun); pre-empted tasks requeue themselves.
#   PHOTOZ_CHECKPOINT=runs/finetune/best_model.pt PHOTOZ_DATA="/scratch/sdss/a /scratch/sdss/b" \
#   PHOTOZ_CATALOGUE=/scratch/$USER/catalogue sbatch --array=0-15 slurm/predict.sh [--pdf] [--tta 4]
# then merge/verify (every galaxy exactly once, every checksum; writes manifest.json) when all tasks are done:
#   PHOTOZ_CATALOGUE=/scratch/$USER/catalogue sbatch --dependency=afterok:JOBID --ntasks-per-node=1 \
#     --gpus-per-node=0 slurm/predict.sh --verify
# Outside Slurm (a workstation, a test) the same script runs the whole catalogue in this one process.
# Site settings go in slurm/site.sh (see site.example.sh); extra arguments go to `photoz-hpc predict`.
#SBATCH --job-name=photoz-predict
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%A_%a.out
set -euo pipefail

if [[ -n ${SLURM_JOB_ID:-} ]]; then cd "${SLURM_SUBMIT_DIR:?}"; fi
SITE=${PHOTOZ_SITE:-slurm/site.sh}
if [[ -f "$SITE" ]]; then set +u; source "$SITE"; set -u; fi   # module/conda scripts use unset vars

: "${PHOTOZ_CATALOGUE:?set PHOTOZ_CATALOGUE to the catalogue directory (created; re-used to resume)}"
: "${PYTHON:=python3}"

if [[ ${1:-} == --verify ]]; then                  # the merge/verify step: one process, no GPU needed
  shift
  verify_args=()
  [[ -n ${PHOTOZ_DATA:-} ]] && { read -r -a data <<< "$PHOTOZ_DATA"; verify_args+=(--data "${data[@]}"); }
  exec "$PYTHON" -m photoz_hpc catalogue-verify "$PHOTOZ_CATALOGUE" "${verify_args[@]}" "$@"
fi

: "${PHOTOZ_CHECKPOINT:?set PHOTOZ_CHECKPOINT to the fine-tuned network (best_model.pt or photoz_model.pt)}"
: "${PHOTOZ_DATA:?set PHOTOZ_DATA to the prepared dataset directories, separated by spaces}"
: "${PHOTOZ_BACKEND:=auto}"                        # dist.backend: auto | horovod | torch | none
: "${PHOTOZ_SRUN_MPI:=pmix}"                       # srun --mpi plugin (PHOTOZ_SRUN_MPI=none: no pmix, torch backend)
read -r -a data <<< "$PHOTOZ_DATA"
[[ -f "$PHOTOZ_CHECKPOINT" ]] || { echo "checkpoint $PHOTOZ_CHECKPOINT not found" >&2; exit 2; }
for d in "${data[@]}"; do [[ -f "$d/manifest.json" ]] || { echo "$d is not a prepared dataset" >&2; exit 2; }; done

args=(--checkpoint "$PHOTOZ_CHECKPOINT" --data "${data[@]}" --out "$PHOTOZ_CATALOGUE")
if [[ -n ${SLURM_ARRAY_TASK_ID:-} ]]; then         # this task's contiguous block of the shards
  count=$((SLURM_ARRAY_TASK_MAX - SLURM_ARRAY_TASK_MIN + 1))
  if [[ ${SLURM_ARRAY_TASK_STEP:-1} -ne 1 || $count -ne ${SLURM_ARRAY_TASK_COUNT:-$count} ]]; then
    echo "use a contiguous array (--array=0-N, throttling with %K is fine)" >&2; exit 2
  fi
  args+=(--block "$((SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN))/$count")
fi
mkdir -p "$PHOTOZ_CATALOGUE"

if [[ -z ${SLURM_JOB_ID:-} ]]; then                # no Slurm: one process, exit code as is (75 = pre-empted)
  exec "$PYTHON" -m photoz_hpc predict "${args[@]}" "$@" "dist.backend=$PHOTOZ_BACKEND"
fi

export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
{
  echo "== $(date -Is) job ${SLURM_JOB_ID} array ${SLURM_ARRAY_JOB_ID:-none}_${SLURM_ARRAY_TASK_ID:-none} restart ${SLURM_RESTART_COUNT:-0}"
  echo "nodes=${SLURM_JOB_NUM_NODES} tasks=${SLURM_NTASKS} nodelist=${SLURM_JOB_NODELIST} master=${MASTER_ADDR}:${MASTER_PORT}"
  "$PYTHON" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)'
} >> "$PHOTOZ_CATALOGUE/launch.log"

# Pre-emption/time limit as in slurm/pretrain.sh: the ranks finish their current part and exit 75; this shell
# survives until srun returns (the traps only note the signal) and then requeues the task, which skips done parts.
pid="" sig=""
trap 'sig=TERM; echo "batch shell: SIGTERM, waiting for the ranks to finish their parts" >&2' TERM
trap 'sig=USR1; [[ -n $pid ]] && kill -USR1 "$pid" 2>/dev/null || true' USR1
set +e
srun --kill-on-bad-exit=1 --cpu-bind=cores --mpi="$PHOTOZ_SRUN_MPI" \
  "$PYTHON" -m photoz_hpc predict "${args[@]}" "$@" "dist.backend=$PHOTOZ_BACKEND" &
pid=$!
while :; do
  sig=""
  wait "$pid"; rc=$?
  [[ -n $sig && $rc -gt 128 ]] || break            # interrupted by a trapped signal: srun still running
done
trap - TERM USR1
set -e
echo "== $(date -Is) job ${SLURM_JOB_ID} exit code $rc" >> "$PHOTOZ_CATALOGUE/launch.log"
if [[ $rc -eq 75 ]]; then                          # EXIT_PREEMPTED: finished parts are kept
  echo "pre-empted or out of time: finished parts kept, requeueing job ${SLURM_JOB_ID}"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit $rc
