#!/bin/bash
# MoCo v2 pretraining across nodes: one rank per GPU, launched by srun.
#   sbatch slurm/pretrain.sh                         # defaults below
#   sbatch --nodes=8 slurm/pretrain.sh train.epochs=200 loader.batch_size=128
# Site settings (account, partition, modules) go in slurm/site.sh (see site.example.sh) or #SBATCH
# lines of your own; every extra argument is a config override (key=value).
#SBATCH --job-name=photoz-pretrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:?run this script with sbatch}"
SITE=${PHOTOZ_SITE:-slurm/site.sh}
if [[ -f "$SITE" ]]; then set +u; source "$SITE"; set -u; fi   # module/conda scripts use unset vars

: "${PHOTOZ_CONFIG:=configs/pretrain.yaml}"
: "${PHOTOZ_DATA:=}"                               # dataset directory (else data.path from the config)
: "${PHOTOZ_BACKEND:=auto}"                        # dist.backend: auto | horovod | torch | none
: "${PHOTOZ_RUN_DIR:=runs/pretrain-${SLURM_JOB_ID}}"
: "${PHOTOZ_SRUN_MPI:=pmix}"                       # srun --mpi plugin your MPI was built for (Horovod over MPI
                                                   # needs it to connect the tasks); PHOTOZ_SRUN_MPI=none where
                                                   # Slurm has no pmix plugin (fine for dist.backend=torch)
: "${PYTHON:=python3}"
[[ -f "$PHOTOZ_CONFIG" ]] || { echo "config $PHOTOZ_CONFIG not found" >&2; exit 2; }

export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
mkdir -p "$PHOTOZ_RUN_DIR"

# Leave a record of where and how this ran (restarts append).
{
  echo "== $(date -Is) job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0}"
  echo "nodes=${SLURM_JOB_NUM_NODES} tasks=${SLURM_NTASKS} nodelist=${SLURM_JOB_NODELIST} master=${MASTER_ADDR}:${MASTER_PORT}"
  "$PYTHON" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)'
} >> "$PHOTOZ_RUN_DIR/launch.log"

overrides=("out_dir=$PHOTOZ_RUN_DIR" "dist.backend=$PHOTOZ_BACKEND" "train.resume=auto")
[[ -n "$PHOTOZ_DATA" ]] && overrides+=("data.path=$PHOTOZ_DATA")

# Pre-emption/time limit: the ranks get SIGUSR1 (--signal=USR1@300) or SIGTERM, checkpoint and exit 75. This
# shell must survive until srun returns so that it can requeue: srun runs in the background and the traps
# only note the signal (`wait` returns early on a trapped signal, so it is repeated until srun has ended).
# USR1 sent to this shell alone (--signal=B:USR1@T, scancel --batch) is passed on to srun, which forwards
# it to the ranks; TERM is not (srun answers SIGTERM by SIGKILLing the ranks; Slurm signals them itself).
pid="" sig=""
trap 'sig=TERM; echo "batch shell: SIGTERM, waiting for the ranks to checkpoint" >&2' TERM
trap 'sig=USR1; [[ -n $pid ]] && kill -USR1 "$pid" 2>/dev/null || true' USR1
set +e
srun --kill-on-bad-exit=1 --cpu-bind=cores --mpi="$PHOTOZ_SRUN_MPI" \
  "$PYTHON" -m photoz_hpc pretrain --config "$PHOTOZ_CONFIG" "${overrides[@]}" "$@" &
pid=$!
while :; do
  sig=""
  wait "$pid"; rc=$?
  [[ -n $sig && $rc -gt 128 ]] || break            # interrupted by a trapped signal: srun still running
done
trap - TERM USR1   # `scontrol requeue` below ends this shell with SIGTERM: it must not outlive the requeue
set -e
echo "== $(date -Is) exit code $rc" >> "$PHOTOZ_RUN_DIR/launch.log"
if [[ $rc -eq 75 ]]; then          # EXIT_PREEMPTED: checkpoint saved on SIGUSR1/SIGTERM
  echo "pre-empted or out of time: checkpoint saved, requeueing job ${SLURM_JOB_ID}"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit $rc
