"""The one communication interface and its serial implementation.

Interface: ``rank``, ``local_rank``, ``world``; tensors: ``allreduce(t, op)``, ``allgather(t)``, and
``allgather_node(t)`` among this rank's node (``node_size`` ranks, ours at ``node_rank``; ``node_error`` says
why a launch has no usable node groups, see ``nodes.py``); small
Python objects: ``allgather_object``, ``broadcast_object``, ``gather_object``; host arrays:
``allreduce_array`` and ``barrier`` (data preparation); the three training hooks (``wrap_model``,
``wrap_optimizer``, ``broadcast_state``); ``shutdown``. Collectives return new tensors and accumulate
their wall time in ``comm_seconds`` (step timing); ``calls`` counts them for the hung-rank report.
Implementations: ``torch_comm.TorchComm``, ``horovod_comm.HorovodComm``, ``mpi_comm.MPIComm``;
``select`` picks one.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import nn

from photoz_hpc.comm.nodes import node_groups
from photoz_hpc.errors import PhotozError


class CollectiveError(RuntimeError):
    """A collective failed or timed out; the message says which rank(s) did not respond, when known."""

#: ``node_error`` of a multi-rank communicator made without ``init_comm(node_groups=True)``.
NO_NODE_GROUPS = "node groups were not set up (init_comm(..., node_groups=True), as moco.bn_mode 'shuffle-node' asks)"


class Comm:
    """The interface, and its serial implementation (backend ``none``, a one-process ``prepare``)."""

    name = "none"

    def __init__(self) -> None:
        self.rank, self.local_rank, self.world = 0, 0, 1
        self.comm_seconds = 0.0
        self.calls = 0  # explicit collectives entered (same sequence on every rank)
        self.timeout_s = 0.0
        self.node_size, self.node_rank = 1, 0  # the ranks sharing our node, and our place among them
        self.node_error: str | None = None  # why node groups are unusable (ranks of a node not in one block)

    # -- tensors
    def allreduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if op not in ("sum", "mean", "max", "min"):
            raise ValueError(f"unknown reduce op '{op}'")
        return t.clone()

    def allgather(self, t: torch.Tensor) -> torch.Tensor:
        return t.clone()

    def allgather_node(self, t: torch.Tensor) -> torch.Tensor:
        """``allgather`` among the ``node_size`` ranks of our node only (fast links, traffic independent of
        ``world``); rows in node-rank order. A one-rank node moves nothing."""
        self._check_node()
        return t.detach().clone()

    # -- python objects (small: paths, RNG and loader states)
    def allgather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        return obj

    # -- training hooks
    def wrap_model(self, model: nn.Module, device: torch.device, ignore_buffers: list[str]) -> nn.Module:
        return model

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
        return optimizer

    def broadcast_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, ignore_buffers: list[str]) -> None:
        pass

    # -- host arrays and objects (data preparation: histograms, counts, shard records)
    # (built on allgather_object here; MPIComm has direct versions)
    def barrier(self) -> None:
        self.allgather_object(None)

    def allreduce_array(self, array: np.ndarray, op: str = "sum") -> np.ndarray:
        """Element-wise reduction of a NumPy array over ranks (``sum`` or ``max``)."""
        if op not in ("sum", "max"):
            raise ValueError(f"unknown reduce op '{op}'")
        stacked = np.stack([np.asarray(a) for a in self.allgather_object(np.asarray(array))])
        return stacked.sum(axis=0, dtype=stacked.dtype) if op == "sum" else stacked.max(axis=0)

    def gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` on rank 0 (an empty list elsewhere)."""
        objs = self.allgather_object(obj)
        return list(objs) if self.rank == 0 else []

    def shutdown(self) -> None:
        pass

    def peer_report(self) -> str:
        """Which ranks did not reach the collective this rank is in (see ``liveness.Heartbeat``)."""
        return "cannot tell which rank did not respond (no heartbeat channel)"

    # -- helpers
    def _find_node(self) -> list[list[int]] | None:
        """Every node's ranks (a collective: all local ranks), setting ``node_size`` and ``node_rank``; None,
        with ``node_error`` set, when the nodes are not blocks of consecutive ranks of one size."""
        try:
            groups = node_groups(self.allgather_object(self.local_rank))
        except PhotozError as exc:
            self.node_error = str(exc)
            return None
        mine = next(g for g in groups if self.rank in g)
        self.node_size, self.node_rank = len(mine), mine.index(self.rank)
        return groups

    def _check_node(self) -> None:
        if self.node_error:
            raise PhotozError(f"rank {self.rank}: no node-local collectives with dist.backend '{self.name}': "
                              f"{self.node_error}")

    def _timed(self, fn, *args, **kw):
        self.calls += 1
        t0 = time.perf_counter()
        try:
            return fn(*args, **kw)
        except RuntimeError as exc:
            if self.world < 2 or isinstance(exc, CollectiveError):
                raise
            waited = time.perf_counter() - t0
            raise CollectiveError(
                f"rank {self.rank}: collective #{self.calls} ({getattr(fn, '__name__', fn)}) failed after "
                f"{waited:.0f} s (dist.timeout_s={self.timeout_s:g}): {self.peer_report()}. Cause: {exc}"
            ) from exc
        finally:
            self.comm_seconds += time.perf_counter() - t0
