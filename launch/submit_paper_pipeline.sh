#!/usr/bin/env bash
# The paper's pipeline in one submission, from a login node: prepare -> pretrain -> fine-tune sweep (a job
# array) -> sweep report, each job starting only when the one before succeeded (--dependency=afterok).
#   launch/submit_paper_pipeline.sh --data /scratch/$USER/sdss --inputs "unlabeled.h5 labeled.h5" \
#     --sweep configs/sweep.yaml [--throttle 16] [--dry-run] [-- pretrain key=value overrides]
# Prints each job id (and, with --dry-run, the sbatch lines instead of submitting). Site settings come from
# PHOTOZ_SITE (slurm/sites/NAME.env), read here before sbatch; PHOTOZ_SBATCH_ARGS there goes to every sbatch.
# Pretraining writes into the directory of the sweep file's `encoder` (RUN_DIR/encoder.pt), unless --pretrain-dir.
set -euo pipefail
cd "$(dirname "$0")/.."
usage="usage: launch/submit_paper_pipeline.sh --data DIR --sweep FILE [--inputs \"A.h5 B.h5\"] [--pretrain-config FILE]
  [--pretrain-dir DIR] [--throttle M] [--sbatch \"OPTS\"] [--prepare-sbatch|--pretrain-sbatch|--sweep-sbatch|--report-sbatch \"OPTS\"]
  [--prepare-args \"ARGS\"] [--dry-run] [-- PRETRAIN_OVERRIDES...]"
data="" sweep="" inputs="" config=configs/pretrain.yaml pretrain_dir="" throttle=8 dry=0 prepare_args=""
declare -A stage_opts=([all]="" [prepare]="" [pretrain]="" [sweep]="" [report]="")
while [[ $# -gt 0 ]]; do
  case $1 in
    --data) data=$2; shift 2 ;;
    --sweep) sweep=$2; shift 2 ;;
    --inputs) inputs=$2; shift 2 ;;
    --pretrain-config) config=$2; shift 2 ;;
    --pretrain-dir) pretrain_dir=$2; shift 2 ;;
    --throttle) throttle=$2; shift 2 ;;
    --prepare-args) prepare_args=$2; shift 2 ;;
    --sbatch) stage_opts[all]=$2; shift 2 ;;
    --prepare-sbatch|--pretrain-sbatch|--sweep-sbatch|--report-sbatch) s=${1#--}; stage_opts[${s%-sbatch}]=$2; shift 2 ;;
    --dry-run) dry=1; shift ;;
    -h|--help) echo "$usage"; exit 0 ;;
    --) shift; break ;;
    *) echo "unknown argument $1" >&2; echo "$usage" >&2; exit 2 ;;
  esac
done
source slurm/common.sh
photoz_load_site                                   # PHOTOZ_SITE: fails at once on an unknown site
: "${PYTHON:=python3}"
[[ -n $data && -n $sweep ]] || photoz_die "--data and --sweep are required
$usage"
[[ -f $sweep ]] || photoz_die "--sweep: sweep file $sweep not found"
[[ -f $config ]] || photoz_die "--pretrain-config: config $config not found"
[[ $throttle =~ ^[1-9][0-9]*$ ]] || photoz_die "--throttle must be a positive integer, got '$throttle'"
read -r -a input_files <<< "$inputs"
for f in "${input_files[@]}"; do [[ -f $f ]] || photoz_die "--inputs: $f not found"; done
if [[ ${#input_files[@]} -eq 0 ]]; then photoz_require_dataset "$data" "--data (no --inputs to prepare it from)"; fi

# The sweep: its size N and the encoder it fine-tunes (pretraining's output), checked now.
plan=$("$PYTHON" - "$sweep" 2>&1 <<'PY'
import sys
from photoz_hpc.errors import ConfigError
from photoz_hpc.launch.sweep import load_sweep, task_configs
try:
    sweep = load_sweep(sys.argv[1])
    print(len(task_configs(sweep)), sweep.encoder or "-")
except ConfigError as exc:
    sys.exit(str(exc))
PY
) || photoz_die "${plan##*$'\n'}"
read -r n_tasks encoder <<< "${plan##*$'\n'}"
if [[ -z $pretrain_dir ]]; then
  [[ $encoder == */encoder.pt ]] || photoz_die "the sweep's encoder ($encoder) is not RUN_DIR/encoder.pt: give --pretrain-dir"
  pretrain_dir=$(dirname "$encoder")
fi
overrides=("$@")
photoz_check_config "$config" "out_dir=$pretrain_dir" "${overrides[@]}"

# submit STAGE ENV... -- SBATCH_ARGS... : sets $jobid (with --dry-run: prints the line, and a placeholder id)
submit() {
  local stage=$1 envs=() site_opts=() all=() own=()
  shift
  while [[ $1 != -- ]]; do envs+=("$1"); shift; done
  shift
  read -r -a site_opts <<< "${PHOTOZ_SBATCH_ARGS:-}"
  read -r -a all <<< "${stage_opts[all]}"
  read -r -a own <<< "${stage_opts[$stage]}"
  local cmd=(sbatch --parsable "${site_opts[@]}" "${all[@]}" "${own[@]}" "$@")
  if (( dry )); then
    printf '%q ' "${envs[@]}" "${cmd[@]}"; echo
    jobid=${stage^^}_JOB
  else
    jobid=$(env "${envs[@]}" "${cmd[@]}") || photoz_die "sbatch of the $stage job failed"
    jobid=${jobid%%;*}
  fi
}

site=()
[[ -n ${PHOTOZ_SITE:-} ]] && site=(PHOTOZ_SITE="$PHOTOZ_SITE")
dep=()
if [[ ${#input_files[@]} -gt 0 ]]; then
  read -r -a pargs <<< "$prepare_args"
  submit prepare "${site[@]}" -- slurm/prepare.sh --out "$data" "${input_files[@]}" "${pargs[@]}"
  echo "prepare   $jobid"
  dep=(--dependency="afterok:$jobid")
fi
submit pretrain "${site[@]}" PHOTOZ_DATA="$data" PHOTOZ_CONFIG="$config" PHOTOZ_RUN_DIR="$pretrain_dir" -- \
  "${dep[@]}" slurm/pretrain.sh "${overrides[@]}"
echo "pretrain  $jobid"
submit sweep "${site[@]}" PHOTOZ_SWEEP="$sweep" -- --dependency="afterok:$jobid" \
  --array="0-$((n_tasks - 1))%$throttle" slurm/finetune_sweep.sh
echo "sweep     $jobid (array 0-$((n_tasks - 1))%$throttle)"
submit report "${site[@]}" PHOTOZ_SWEEP="$sweep" -- --dependency="afterok:$jobid" --ntasks=1 \
  --ntasks-per-node=1 --gpus-per-node=0 slurm/finetune_sweep.sh --report
echo "report    $jobid"
(( dry )) && echo "(dry run: nothing submitted)"
echo "watch: squeue -u ${USER:-$(id -un)}; the report lands in the sweep's runs_dir/report/ (report.md, figure2.png)"
