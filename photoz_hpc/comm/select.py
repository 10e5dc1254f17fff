"""Which communicator a process gets: ``init_comm`` for training (``dist.backend``), ``prepare_comm``
for data preparation (MPI when an MPI launcher started the process)."""

from __future__ import annotations

from photoz_hpc.comm.base import Comm
from photoz_hpc.comm.horovod_comm import HorovodComm, horovod_available
from photoz_hpc.comm.mpi_comm import MPIComm, launched_under_mpi
from photoz_hpc.comm.torch_comm import TorchComm
from photoz_hpc.errors import ConfigError, PhotozError
from photoz_hpc.launch_env import LaunchEnv, detect_env


def resolve_backend(requested: str, env: LaunchEnv) -> str:
    """``auto``: Horovod when launched by horovodrun/mpirun and importable, torch for other multi-rank
    launches, ``none`` for a single process."""
    if requested != "auto":
        return requested
    if env.launcher == "horovodrun" or (env.launcher in ("openmpi", "pmi", "slurm") and horovod_available()):
        return "horovod" if horovod_available() else "torch"
    return "torch" if env.world > 1 else "none"


def init_comm(backend: str = "auto", timeout_s: float = 600.0, device_type: str = "cpu",
              node_groups: bool = False) -> Comm:
    """Create the communicator for ``dist.backend``; errors say what is missing. ``node_groups``: also set up
    the per-node groups of ``Comm.allgather_node`` (``moco.bn_mode: shuffle-node``; off by default, so other
    runs make no extra groups or Horovod process sets)."""
    env = detect_env()
    backend = resolve_backend(backend, env)
    if backend == "none":
        if env.world > 1:
            raise ConfigError(f"dist.backend 'none' but launched as {env.world} ranks by {env.launcher}")
        return Comm()
    if backend == "horovod":
        if not horovod_available():
            raise ConfigError("dist.backend 'horovod' but 'import horovod.torch' fails: run launch/install_horovod.sh")
        return HorovodComm(timeout_s, device_type, env, node_groups)
    if backend == "torch":
        return TorchComm(env, timeout_s, device_type, node_groups)
    raise ConfigError(f"dist.backend '{backend}' is not one of ['auto', 'horovod', 'torch', 'none']")


def prepare_comm(mode: str = "auto") -> Comm:
    """``auto``: MPI if an MPI launcher started us; ``mpi``: require it; ``serial``: never."""
    if mode not in ("auto", "mpi", "serial"):
        raise PhotozError(f"unknown comm mode '{mode}' (auto, mpi, serial)")
    if mode == "mpi" or (mode == "auto" and launched_under_mpi()):
        return MPIComm()
    return Comm()
