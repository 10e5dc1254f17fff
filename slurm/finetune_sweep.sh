#!/bin/bash
# A label-fraction sweep as a job array: array task i runs sweep task i (one method, label fraction, seed; see
# docs/sweeps.md), one rank per GPU. N comes from `photoz-hpc sweep-plan FILE`; %M runs at most M at a time:
#   PHOTOZ_SWEEP=configs/sweep.yaml sbatch --array=0-80%16 slurm/finetune_sweep.sh
# then the report (Figure 2, labels saved) once every task has finished:
#   PHOTOZ_SWEEP=configs/sweep.yaml sbatch --dependency=afterok:ARRAY_JOB_ID slurm/finetune_sweep.sh --report
# Resubmitting the same array skips finished tasks at once and resumes unfinished ones from their checkpoints;
# a pre-empted task (SIGUSR1 300 s before its limit, or SIGTERM) checkpoints and requeues itself.
# Outside Slurm the script runs every task in this one process (PHOTOZ_TASK_ID=N for one).
#SBATCH --job-name=photoz-sweep
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%A_%a.out
set -euo pipefail
if [[ -n ${SLURM_JOB_ID:-} ]]; then cd "${SLURM_SUBMIT_DIR:?}"; fi
source slurm/common.sh
photoz_setup

: "${PHOTOZ_SWEEP:?set PHOTOZ_SWEEP to the sweep file (e.g. configs/sweep.yaml; see docs/sweeps.md)}"
[[ -f $PHOTOZ_SWEEP ]] || photoz_die "PHOTOZ_SWEEP: sweep file $PHOTOZ_SWEEP not found"

# The sweep file, every task's config and this task's state, checked before anything is launched.
task=${SLURM_ARRAY_TASK_ID:-${PHOTOZ_TASK_ID:-all}}
[[ ${1:-} == --report ]] && task=report
plan=$("$PYTHON" - "$PHOTOZ_SWEEP" "$task" 2>&1 <<'PY'

import sys
from photoz_hpc.errors import ConfigError
from photoz_hpc.launch.sweep import load_sweep, select_tasks, task_configs, task_state
try:
    sweep = load_sweep(sys.argv[1])
    pairs = task_configs(sweep)
    chosen = pairs if sys.argv[2] in ("all", "report") else select_tasks(sweep, pairs, sys.argv[2])
    states = [task_state(sweep, t, c) for t, c in chosen]
except ConfigError as exc:
    sys.exit(str(exc))
changed = [(t, d) for (t, _), (s, d) in zip(chosen, states) if s == "changed"]
if changed and sys.argv[2] != "report":
    sys.exit(f"task {changed[0][0].index}: {changed[0][0].dir} was run with another config ({changed[0][1]}): "
             "move that directory away or use a new runs_dir")
state = states[0][0] if len(chosen) == 1 else "-"
print(sweep.runs_dir, len(pairs), state, chosen[0][0].dir if len(chosen) == 1 else sweep.runs_dir, sep="\t")  # paths may hold spaces
PY
) || photoz_die "sweep: ${plan##*$'\n'}"
IFS=$'\t' read -r runs_dir n_tasks state task_dir <<< "${plan##*$'\n'}"
logs=$runs_dir/logs
mkdir -p "$logs"

if [[ $task == report ]]; then                     # one process, no GPU needed
  shift
  exec "$PYTHON" -m photoz_hpc sweep-report "$runs_dir" --sweep "$PHOTOZ_SWEEP" "$@"
fi
if [[ -n ${SLURM_ARRAY_TASK_ID:-} && ${SLURM_ARRAY_TASK_MAX:-0} -ge $n_tasks ]]; then
  photoz_die "--array goes up to $SLURM_ARRAY_TASK_MAX but $PHOTOZ_SWEEP has $n_tasks tasks: use --array=0-$((n_tasks - 1))%M"
fi
cmd=("$PYTHON" -m photoz_hpc finetune --sweep "$PHOTOZ_SWEEP" --task-id "$task")
if [[ -z ${SLURM_JOB_ID:-} ]]; then                # no Slurm: one process, exit code as is (EXIT_PREEMPTED = pre-empted)
  exec "${cmd[@]}"
fi
log_dir=$logs/task-$task
if [[ $state == finished ]]; then
  mkdir -p "$log_dir"
  echo "== $(date -Is) job ${SLURM_JOB_ID} task $task ($task_dir) is finished: skipped" | tee -a "$log_dir/launch.log"
  exit 0
fi
photoz_record "$log_dir"
echo "task $task -> $task_dir (state $state)" >> "$log_dir/launch.log"
photoz_srun "$log_dir" "${cmd[@]}"
photoz_finish "$log_dir"
