#!/bin/bash
# Survey-scale inference: the photo-z catalogue of many prepared datasets. One Slurm array task per
# contiguous block of input shards, each task one rank per GPU (srun); pre-empted tasks requeue themselves.
#   PHOTOZ_CHECKPOINT=runs/finetune/best_model.pt PHOTOZ_DATA="/scratch/sdss/a /scratch/sdss/b" \
#   PHOTOZ_CATALOGUE=/scratch/$USER/catalogue sbatch --array=0-15 slurm/predict.sh [--pdf] [--tta 4]
# then merge/verify (every galaxy exactly once, every checksum; writes manifest.json) when all tasks are done:
#   PHOTOZ_CATALOGUE=/scratch/$USER/catalogue sbatch --dependency=afterok:JOBID --ntasks-per-node=1 \
#     --gpus-per-node=0 slurm/predict.sh --verify
# Outside Slurm (a workstation, a test) the same script runs the whole catalogue in this one process.
# Site settings: PHOTOZ_SITE (slurm/sites/NAME.env, see slurm/common.sh); extra arguments go to `photoz-hpc predict`.
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
source slurm/common.sh
photoz_setup                                       # site file, Python, the pre-emption exit code, srun MPI plugin

: "${PHOTOZ_CATALOGUE:?set PHOTOZ_CATALOGUE to the catalogue directory (created; re-used to resume)}"

if [[ ${1:-} == --verify ]]; then                  # the merge/verify step: one process, no GPU needed
  shift
  verify_args=()
  [[ -n ${PHOTOZ_DATA:-} ]] && { read -r -a data <<< "$PHOTOZ_DATA"; verify_args+=(--data "${data[@]}"); }
  exec "$PYTHON" -m photoz_hpc catalogue-verify "$PHOTOZ_CATALOGUE" "${verify_args[@]}" "$@"
fi

: "${PHOTOZ_CHECKPOINT:?set PHOTOZ_CHECKPOINT to the fine-tuned network (best_model.pt or photoz_model.pt)}"
: "${PHOTOZ_DATA:?set PHOTOZ_DATA to the prepared dataset directories, separated by spaces}"
: "${PHOTOZ_BACKEND:=auto}"                        # dist.backend: auto | horovod | torch | none
read -r -a data <<< "$PHOTOZ_DATA"
[[ -f "$PHOTOZ_CHECKPOINT" ]] || photoz_die "PHOTOZ_CHECKPOINT: $PHOTOZ_CHECKPOINT not found"
for d in "${data[@]}"; do photoz_require_dataset "$d" PHOTOZ_DATA; done

args=(--checkpoint "$PHOTOZ_CHECKPOINT" --data "${data[@]}" --out "$PHOTOZ_CATALOGUE")
if [[ -n ${SLURM_ARRAY_TASK_ID:-} ]]; then         # this task's contiguous block of the shards
  count=$((SLURM_ARRAY_TASK_MAX - SLURM_ARRAY_TASK_MIN + 1))
  if [[ ${SLURM_ARRAY_TASK_STEP:-1} -ne 1 || $count -ne ${SLURM_ARRAY_TASK_COUNT:-$count} ]]; then
    photoz_die "use a contiguous array (--array=0-N, throttling with %K is fine)"
  fi
  args+=(--block "$((SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN))/$count")
fi
mkdir -p "$PHOTOZ_CATALOGUE"

if [[ -z ${SLURM_JOB_ID:-} ]]; then                # no Slurm: one process, exit code as is (EXIT_PREEMPTED = pre-empted)
  exec "$PYTHON" -m photoz_hpc predict "${args[@]}" "$@" "dist.backend=$PHOTOZ_BACKEND"
fi

# Pre-emption/time limit as in slurm/pretrain.sh: the ranks finish their current part and exit with
# EXIT_PREEMPTED; photoz_finish requeues the task, which skips the finished parts.
photoz_record "$PHOTOZ_CATALOGUE"
photoz_srun "$PHOTOZ_CATALOGUE" "$PYTHON" -m photoz_hpc predict "${args[@]}" "$@" "dist.backend=$PHOTOZ_BACKEND"
photoz_finish "$PHOTOZ_CATALOGUE"
