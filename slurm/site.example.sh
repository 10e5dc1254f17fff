# Superseded by the per-site files slurm/sites/*.env (select one with PHOTOZ_SITE=NAME; see
# slurm/sites/generic.env for every setting). A slurm/site.sh of your own is still sourced when PHOTOZ_SITE
# is unset, by every slurm/*.sh script.
# module load cuda/12.4 openmpi/4.1
# source /path/to/venv/bin/activate
# export NCCL_SOCKET_IFNAME=ib0
