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
SITE=${PHOTOZ_SITE:-slurm/site.sh}
if [[ -f "$SITE" ]]; then set +u; source "$SITE"; set -u; fi   # module/conda scripts use unset vars
: "${PYTHON:=python3}"
: "${PHOTOZ_SRUN_MPI:=pmix}"                       # srun --mpi plugin your MPI was built for
[[ $# -ge 3 ]] || { echo "usage: sbatch slurm/prepare.sh --out DIR INPUT.h5 [...] [--samples-per-shard N]" >&2; exit 2; }
srun --mpi="$PHOTOZ_SRUN_MPI" --kill-on-bad-exit=1 "$PYTHON" -m photoz_hpc prepare "$@"
