"""Minimal process-group interface for data preparation: MPI when launched by mpirun/srun, else serial.

Preparation only needs rank/size, a barrier, integer all-reduce, broadcast and gather; keeping
that behind one small class lets the same code run serially, under ``mpirun`` or ``srun``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from photoz_hpc.errors import PhotozError
from photoz_hpc.launch_env import source_keys

# MPI launchers from the shared detector (their world-size variable suffices), plus variables that only
# MPI/PMIx starters set and that carry no rank/world of their own.
_EXTRA_MPI_ENV = ("PMIX_RANK", "MPI_LOCALNRANKS", "HYDRA_CONTROL_FD")
_MPI_LAUNCHERS = ("openmpi", "pmi")
_MPI_ENV = tuple(source_keys(name)[2] for name in _MPI_LAUNCHERS) + _EXTRA_MPI_ENV


def launched_under_mpi() -> bool:
    """True when an MPI launcher (or ``srun --mpi=pmix``) started this process."""
    # Keys from the shared detector's table, checked independently rather than via detect_env()'s
    # first match: torchrun variables inside a multi-task srun step must still count as MPI here, and
    # a malformed variable of another launcher must not raise.
    if any(key in os.environ for key in _MPI_ENV):
        return True
    k_rank, _, k_world = source_keys("slurm")
    return int(os.environ.get(k_world, "1")) > 1 and k_rank in os.environ


class SerialComm:
    """A one-rank communicator."""

    rank = 0
    size = 1

    def barrier(self) -> None:
        pass

    def allreduce_sum(self, array: np.ndarray) -> np.ndarray:
        return np.asarray(array).copy()

    def allreduce_max(self, value: int) -> int:
        return value

    def bcast(self, obj: Any) -> Any:
        return obj

    def gather(self, obj: Any) -> list[Any]:
        return [obj]


class MPIComm:
    """mpi4py's COMM_WORLD behind the ``SerialComm`` interface."""

    def __init__(self) -> None:
        try:
            from mpi4py import MPI
        except Exception as exc:  # ImportError, or RuntimeError when libmpi is missing
            raise PhotozError(
                f"launched under MPI but mpi4py is unusable ({exc}); install with `pip install -e .[mpi]`"
            ) from exc
        self._mpi = MPI
        self._comm = MPI.COMM_WORLD
        self.rank = self._comm.Get_rank()
        self.size = self._comm.Get_size()
        slurm_tasks = int(os.environ.get("SLURM_NTASKS", "0") or 0) if "SLURM_PROCID" in os.environ else 0
        if slurm_tasks > 1 and self.size != slurm_tasks:
            raise PhotozError(
                f"srun started {slurm_tasks} tasks but MPI sees a world of {self.size}: the tasks are not "
                "connected (use `srun --mpi=pmix` or the --mpi plugin your MPI was built for, or mpirun)"
            )

    def barrier(self) -> None:
        self._comm.Barrier()

    def allreduce_sum(self, array: np.ndarray) -> np.ndarray:
        array = np.ascontiguousarray(array)
        out = np.empty_like(array)
        self._comm.Allreduce(array, out, op=self._mpi.SUM)
        return out

    def allreduce_max(self, value: int) -> int:
        return int(self._comm.allreduce(value, op=self._mpi.MAX))

    def bcast(self, obj: Any) -> Any:
        return self._comm.bcast(obj, root=0)

    def gather(self, obj: Any) -> list[Any]:
        return self._comm.gather(obj, root=0) or []


def get_comm(mode: str = "auto") -> SerialComm | MPIComm:
    """``auto``: MPI if an MPI launcher started us; ``mpi``: require it; ``serial``: never."""
    if mode not in ("auto", "mpi", "serial"):
        raise PhotozError(f"unknown comm mode '{mode}' (auto, mpi, serial)")
    if mode == "mpi" or (mode == "auto" and launched_under_mpi()):
        return MPIComm()
    return SerialComm()
