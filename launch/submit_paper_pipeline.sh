#!/usr/bin/env bash
# The paper's pipeline in one submission, from a login node: prepare -> pretrain -> fine-tune sweep (a job
# array) -> sweep report, each job starting only when the one before succeeded (--dependency=afterok).
#   launch/submit_paper_pipeline.sh --data /scratch/$USER/sdss --inputs "unlabeled.h5 labeled.h5" \
#     --sweep configs/sweep.yaml [--throttle 16] [--dry-run] [-- pretrain key=value overrides]
# Prints each job id (and, with --dry-run, the sbatch lines instead of submitting). Site settings come from
# PHOTOZ_SITE (slurm/sites/NAME.env), read here before sbatch; PHOTOZ_SBATCH_ARGS there goes to every sbatch.
# Pretraining writes into the directory of the sweep file's `encoder` (RUN_DIR/encoder.pt), unless --pretrain-dir;
# the sweep tasks fine-tune on --data (the prepared dataset) from that pretraining's encoder.pt, whatever the
# sweep's finetune_config says (RUNS_DIR/pipeline-sweep.yaml is the sweep file they run).
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

# The sweep as this pipeline runs it: fine-tuning on the dataset it prepares (data.path=$data) and from the encoder
# its pretraining exports ($pretrain_dir/encoder.pt), written as RUNS_DIR/pipeline-sweep.yaml (printed, not written,
# with --dry-run). Every other input path of every task is checked now, before anything is submitted.
prepared=0
[[ ${#input_files[@]} -gt 0 ]] && prepared=1
plan=$("$PYTHON" - "$sweep" "$data" "$pretrain_dir" "$prepared" "$dry" 2>&1 <<'PY'
import os, sys
from pathlib import Path
from photoz_hpc.errors import ConfigError
from photoz_hpc.launch.sweep import check_paths, load_sweep, pipeline_sweep, sweep_yaml, task_configs
path, data, pretrain_dir, prepared, dry = sys.argv[1:]
try:
    sweep = load_sweep(path)
    if not pretrain_dir:
        if not sweep.encoder.endswith("/encoder.pt"):
            sys.exit(f"the sweep's encoder ({sweep.encoder or '-'}) is not RUN_DIR/encoder.pt: give --pretrain-dir")
        pretrain_dir = os.path.dirname(sweep.encoder)
    encoder = os.path.join(pretrain_dir, "encoder.pt")
    out = Path(sweep.runs_dir) / "pipeline-sweep.yaml"
    derived = pipeline_sweep(sweep, data, encoder, out)
    pairs = task_configs(derived)
    check_paths(derived, pairs, (encoder, *([data] if prepared == "1" else [])))
except ConfigError as exc:
    sys.exit(str(exc))
text = sweep_yaml(derived, f"written by launch/submit_paper_pipeline.sh from {path}: data.path and encoder are this "
                           "pipeline's prepared dataset and pretraining export")
if dry == "1":
    print(f"sweep file {out} (dry run: not written):", text, sep="\n", file=sys.stderr)
else:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
print(len(pairs), pretrain_dir, out, sep="\t")
PY
) || photoz_die "${plan##*$'\n'}"
IFS=$'\t' read -r n_tasks pretrain_dir sweep <<< "${plan##*$'\n'}"
if (( dry )); then printf '%s\n' "${plan%$'\n'*}"; fi
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
