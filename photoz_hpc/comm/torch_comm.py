"""torch.distributed: NCCL on GPU, Gloo on CPU; DDP for the gradients; the c10d store as side channel."""

from __future__ import annotations

import datetime
import os
import warnings
from typing import Any

import torch

from photoz_hpc.comm.base import NO_NODE_GROUPS, Comm
from photoz_hpc.comm.devices import cuda_device_index
from photoz_hpc.comm.liveness import Heartbeat
from photoz_hpc.launch_env import LaunchEnv


class TorchComm(Heartbeat, Comm):
    """torch.distributed: NCCL on GPU, Gloo on CPU; DDP for the gradients.

    MoCo/metric collectives run on their own process group so they can never interleave with
    DDP's bucketed all-reduces (they are issued from inside the autograd backward); node-local
    all-gathers on a group per node (``nodes.py``).
    """

    name = "torch"

    def __init__(self, env: LaunchEnv, timeout_s: float, device_type: str, node_groups: bool = False) -> None:
        super().__init__()
        import torch.distributed as dist

        self.dist = dist
        self.rank, self.local_rank, self.world = env.rank, env.local_rank, env.world
        os.environ.setdefault("MASTER_ADDR", os.environ.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1"))
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # a timed-out NCCL op aborts, not hangs
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(torch.device("cuda", cuda_device_index(self.local_rank)))
        timeout = datetime.timedelta(seconds=timeout_s)
        if not dist.is_initialized():
            dist.init_process_group(backend, rank=self.rank, world_size=self.world, timeout=timeout)
        self.group = dist.new_group(backend=backend, timeout=timeout)
        self.obj_group = dist.new_group(backend="gloo", timeout=timeout)
        self.node_group = self.group
        if node_groups:
            self._init_node_group(backend, timeout)
        else:
            self.node_error = NO_NODE_GROUPS
        self._start_heartbeat(timeout_s)

    def _init_node_group(self, backend: str, timeout: datetime.timedelta) -> None:
        """Our node's process group for ``allgather_node``. torch needs every rank to create every group, in
        the same order; a single node uses the world's group, one-rank nodes need none."""
        groups = self._find_node()
        self.node_group = self.group
        if groups is None or not 1 < self.node_size < self.world:
            return
        for ranks in groups:
            group = self.dist.new_group(ranks, backend=backend, timeout=timeout)
            if self.rank in ranks:
                self.node_group = group

    def _store(self):
        if getattr(self, "_kv", None) is None:
            store = self.dist.distributed_c10d._get_default_store()
            self._kv = self.dist.PrefixStore("photoz/", store)
        return self._kv

    def _kv_set(self, key, value):
        self._store().set(key, value)

    def _kv_get(self, key):
        store = self._store()
        return store.get(key).decode() if store.check([key]) else None

    def allreduce(self, t, op="sum"):
        ops = {"sum": self.dist.ReduceOp.SUM, "mean": self.dist.ReduceOp.SUM, "max": self.dist.ReduceOp.MAX,
               "min": self.dist.ReduceOp.MIN}
        out = t.detach().clone()
        self._timed(self.dist.all_reduce, out, ops[op], group=self.group)
        return out / self.world if op == "mean" else out

    def allgather(self, t):
        return self._gather(t, self.group, self.world)

    def allgather_node(self, t):
        self._check_node()
        if self.node_size == 1:
            return t.detach().clone()
        return self._gather(t, self.node_group, self.node_size)

    def _gather(self, t, group, size: int):
        t = t.detach().contiguous()
        out = torch.empty((size * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
        gather = getattr(self.dist, "all_gather_single", None) or self.dist.all_gather_into_tensor
        self._timed(gather, out, t, group=group)
        return out

    def allgather_object(self, obj):
        out: list[Any] = [None] * self.world
        self._timed(self.dist.all_gather_object, out, obj, group=self.obj_group)
        return out

    def broadcast_object(self, obj, root=0):
        box = [obj]
        self._timed(self.dist.broadcast_object_list, box, root, group=self.obj_group)
        return box[0]

    def wrap_model(self, model, device, ignore_buffers):
        from torch.nn.parallel import DistributedDataParallel as DDP

        # Queue shards differ per rank: DDP must neither broadcast them at construction nor per step.
        DDP._set_params_and_buffers_to_ignore_for_model(model, ignore_buffers)
        ids = [device.index] if device.type == "cuda" else None
        with warnings.catch_warnings():  # broadcast_buffers=False is exactly the semantics we need
            warnings.simplefilter("ignore", FutureWarning)
            return DDP(model, device_ids=ids, broadcast_buffers=False)

    def shutdown(self):
        self._stop_heartbeat()
        if self.dist.is_initialized():
            self.dist.destroy_process_group()
