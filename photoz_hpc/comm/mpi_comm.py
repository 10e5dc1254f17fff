"""mpi4py's COMM_WORLD behind the ``Comm`` interface, for data preparation under mpirun or srun.

Preparation needs rank/world, a barrier, array reductions (histograms, counts), broadcast and
gather of small objects; the tensor collectives go through NumPy on the host (never a training path).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from photoz_hpc.comm.base import Comm
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


class MPIComm(Comm):
    """mpi4py's COMM_WORLD."""

    name = "mpi"

    def __init__(self) -> None:
        super().__init__()
        try:
            from mpi4py import MPI
        except Exception as exc:  # ImportError, or RuntimeError when libmpi is missing
            raise PhotozError(
                f"launched under MPI but mpi4py is unusable ({exc}); install with `pip install -e .[mpi]`"
            ) from exc
        self._mpi = MPI
        self._comm = MPI.COMM_WORLD
        self.rank = self._comm.Get_rank()
        self.world = self._comm.Get_size()
        self._node = self._comm.Split_type(MPI.COMM_TYPE_SHARED)  # in global-rank order
        self.local_rank = self.node_rank = self._node.Get_rank()
        self.node_size = self._node.Get_size()
        slurm_tasks = int(os.environ.get("SLURM_NTASKS", "0") or 0) if "SLURM_PROCID" in os.environ else 0
        if slurm_tasks > 1 and self.world != slurm_tasks:
            raise PhotozError(
                f"srun started {slurm_tasks} tasks but MPI sees a world of {self.world}: the tasks are not "
                "connected (use `srun --mpi=pmix` or the --mpi plugin your MPI was built for, or mpirun)"
            )

    def barrier(self) -> None:
        self._comm.Barrier()

    def allreduce_array(self, array: np.ndarray, op: str = "sum") -> np.ndarray:
        if op not in ("sum", "max"):
            raise ValueError(f"unknown reduce op '{op}'")
        array = np.ascontiguousarray(array)
        out = np.empty_like(array)
        self._comm.Allreduce(array, out, op=self._mpi.SUM if op == "sum" else self._mpi.MAX)
        return out

    def allgather_object(self, obj: Any) -> list[Any]:
        return self._comm.allgather(obj)

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        return self._comm.bcast(obj, root=root)

    def gather_object(self, obj: Any) -> list[Any]:
        return self._comm.gather(obj, root=0) or []

    def allreduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if op not in ("sum", "mean", "max", "min"):
            raise ValueError(f"unknown reduce op '{op}'")
        ops = {"sum": self._mpi.SUM, "mean": self._mpi.SUM, "max": self._mpi.MAX, "min": self._mpi.MIN}
        out = self._comm.allreduce(t.detach().cpu().numpy(), op=ops[op])
        out = torch.as_tensor(np.asarray(out), device=t.device)
        return out / self.world if op == "mean" else out

    def allgather(self, t: torch.Tensor) -> torch.Tensor:
        parts = self._comm.allgather(t.detach().cpu().numpy())
        return torch.as_tensor(np.concatenate(parts), device=t.device)

    def allgather_node(self, t: torch.Tensor) -> torch.Tensor:
        parts = self._node.allgather(t.detach().cpu().numpy())
        return torch.as_tensor(np.concatenate(parts), device=t.device)
