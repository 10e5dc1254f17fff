#!/bin/bash
# Convert release HDF5 files into the sharded store, in parallel over MPI ranks (CPU job).
#   sbatch slurm/prepare.sh --out /scratch/photoz/sdss unlabeled.h5 labeled.h5
# Re-submitting after a failure or time-out resumes: completed shards are kept.
#SBATCH --job-name=photoz-prepare
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=16
#SBATCH --cpus-per-task=1
#SBATCH --time=04:00:00
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:?run this script with sbatch}"
source slurm/common.sh
photoz_setup
usage="usage: sbatch slurm/prepare.sh --out DIR INPUT.h5 [...] [--samples-per-shard N]"
[[ $# -ge 3 && $1 == --out ]] || photoz_die "$usage"
for f in "${@:3}"; do
  [[ $f == --* || -f $f || $f =~ ^[0-9]+$ ]] || photoz_die "input file $f not found ($usage)"
done
extra=()
[[ -n ${PHOTOZ_SRUN_ARGS:-} ]] && read -r -a extra <<< "$PHOTOZ_SRUN_ARGS"
srun --mpi="$PHOTOZ_SRUN_MPI" --kill-on-bad-exit=1 "${extra[@]}" "$PYTHON" -m photoz_hpc prepare "$@"
