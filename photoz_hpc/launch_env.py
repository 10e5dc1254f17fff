"""Which launcher started this process, and this process's rank/local rank/world: the one detector.

Torch-free so that logging (``photoz_hpc.logs``) and data preparation (``photoz_hpc.comm.mpi_comm``) can
use it without importing the trainer. Sources are tried in ``ENV_SOURCES`` order (first match wins):
torchrun, horovodrun, Open MPI, PMI (MPICH/Intel MPI/Hydra) and Slurm, so ``horovodrun`` or
``mpirun`` inside a Slurm allocation reports the launcher's rank, not the allocation's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from photoz_hpc.errors import PhotozError


@dataclass
class LaunchEnv:
    rank: int
    local_rank: int
    world: int
    launcher: str  # torchrun | horovodrun | openmpi | pmi | slurm | none


# (launcher, rank key, local-rank key, world-size key)
ENV_SOURCES = (
    ("torchrun", "RANK", "LOCAL_RANK", "WORLD_SIZE"),
    ("horovodrun", "HOROVOD_RANK", "HOROVOD_LOCAL_RANK", "HOROVOD_SIZE"),
    ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_SIZE"),
    ("pmi", "PMI_RANK", "MPI_LOCALRANKID", "PMI_SIZE"),
    ("slurm", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS"),
)


def source_keys(launcher: str) -> tuple[str, str, str]:
    """The (rank, local rank, world size) variables of ``launcher`` (a name in ``ENV_SOURCES``)."""
    for name, k_rank, k_local, k_world in ENV_SOURCES:
        if name == launcher:
            return k_rank, k_local, k_world
    raise KeyError(launcher)


def detect_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Rank, local rank and world size from whichever launcher started us (first match wins)."""
    env = os.environ if environ is None else environ
    for name, k_rank, k_local, k_world in ENV_SOURCES:
        if k_rank in env and k_world in env:
            try:
                return LaunchEnv(int(env[k_rank]), int(env.get(k_local, 0)), int(env[k_world]), name)
            except ValueError as exc:
                raise PhotozError(f"bad {name} environment ({k_rank}/{k_world}): {exc}") from None
    return LaunchEnv(0, 0, 1, "none")
