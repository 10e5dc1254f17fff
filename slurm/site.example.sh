# Copy to slurm/site.sh and adapt: sourced by every slurm/*.sh script before launching.
# module load cuda/12.4 openmpi/4.1
# source /path/to/venv/bin/activate
# export PHOTOZ_DATA=/scratch/$USER/photoz/sdss
# export NCCL_SOCKET_IFNAME=ib0
