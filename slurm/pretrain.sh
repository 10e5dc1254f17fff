#!/bin/bash
# MoCo v2 pretraining across nodes: one rank per GPU, launched by srun.
#   sbatch slurm/pretrain.sh                         # defaults below
#   sbatch --nodes=8 slurm/pretrain.sh train.epochs=200 loader.batch_size=128
#   PHOTOZ_SITE=perlmutter sbatch -A m1234 slurm/pretrain.sh   # site settings from slurm/sites/perlmutter.env
# Every extra argument is a config override (key=value). Pre-empted (SIGUSR1 300 s before the limit, or
# SIGTERM): the ranks checkpoint, the job requeues itself and resumes exactly (train.resume=auto).
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
[[ -n ${SLURM_JOB_ID:-} ]] || { echo "run this script with sbatch" >&2; exit 2; }
cd "${SLURM_SUBMIT_DIR:?}"
source slurm/common.sh
photoz_setup

: "${PHOTOZ_CONFIG:=configs/pretrain.yaml}"
: "${PHOTOZ_DATA:=}"                               # dataset directory (else data.path from the config)
: "${PHOTOZ_BACKEND:=auto}"                        # dist.backend: auto | horovod | torch | none
: "${PHOTOZ_RUN_DIR:=runs/pretrain-${SLURM_JOB_ID}}"
[[ -f $PHOTOZ_CONFIG ]] || photoz_die "PHOTOZ_CONFIG: config $PHOTOZ_CONFIG not found"
[[ -n $PHOTOZ_DATA ]] && photoz_require_dataset "$PHOTOZ_DATA" PHOTOZ_DATA
base=("out_dir=$PHOTOZ_RUN_DIR" "dist.backend=$PHOTOZ_BACKEND" "train.resume=auto")
[[ -n $PHOTOZ_DATA ]] && photoz_check_config "$PHOTOZ_CONFIG" "${base[@]}" "data.path=$PHOTOZ_DATA" "$@"
[[ -n $PHOTOZ_DATA ]] || photoz_check_config "$PHOTOZ_CONFIG" "${base[@]}" "$@"
photoz_stage PHOTOZ_DATA "$PHOTOZ_CONFIG" "${base[@]}" "$@"   # PHOTOZ_STAGE=1: a node-local copy (data.partition)
overrides=("${base[@]}")
[[ -n $PHOTOZ_DATA ]] && overrides+=("data.path=$PHOTOZ_DATA")
photoz_record "$PHOTOZ_RUN_DIR"
photoz_srun "$PHOTOZ_RUN_DIR" "$PYTHON" -m photoz_hpc pretrain --config "$PHOTOZ_CONFIG" "${overrides[@]}" "$@"
photoz_finish "$PHOTOZ_RUN_DIR"
