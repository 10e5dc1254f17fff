"""Horovod (MPI or Gloo controller, NCCL on GPU): ``hvd.DistributedOptimizer`` averages gradients;
horovodrun's rendezvous key-value server is the side channel; node-local all-gathers run on one process
set per node, made at ``hvd.init``. Horovod needs contiguous tensors: a
channels_last model's weights and gradients are handed over as contiguous views (``horovod_view``)."""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

import torch

from photoz_hpc.comm.base import NO_NODE_GROUPS, Comm
from photoz_hpc.comm.devices import cuda_device_index
from photoz_hpc.comm.liveness import Heartbeat
from photoz_hpc.comm.nodes import LOCAL_SIZE_VARS, env_local_size, uniform_groups
from photoz_hpc.errors import ConfigError, PhotozError
from photoz_hpc.launch_env import LaunchEnv, detect_env


def horovod_available() -> bool:
    try:
        import horovod.torch  # noqa: F401
    except Exception:  # ImportError, or a Horovod built against another torch
        return False
    return True


def horovod_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` if it is contiguous, else a contiguous view of the same memory: a channels_last 4-d tensor
    (conv weights and their gradients in a channels_last model) permuted to its NHWC storage order.
    Horovod's ops need contiguous tensors and write their results in place, so a view (unlike a copy)
    receives the result, and no step pays for a layout copy."""
    if t.is_contiguous():
        return t
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1)
    raise PhotozError(f"Horovod needs contiguous tensors; got shape {tuple(t.shape)} with strides {t.stride()}")


class HorovodViews:
    """Horovod ``Compression`` that hands gradients over as ``horovod_view``s and restores their shape
    (``DistributedOptimizer.synchronize`` sets ``p.grad`` to ``decompress(output)``: the same memory)."""

    @staticmethod
    def compress(tensor: torch.Tensor):
        view = horovod_view(tensor)
        return view, view is not tensor

    @staticmethod
    def decompress(tensor: torch.Tensor, permuted: bool) -> torch.Tensor:
        return tensor.permute(0, 3, 1, 2) if permuted else tensor


def node_process_sets(hvd, world: int) -> list:
    """One Horovod process set per node, for ``hvd.init``: adding sets later needs
    HOROVOD_DYNAMIC_PROCESS_SETS=1, which slows every Horovod op. The nodes come from the ranks per node
    the launcher states; none for a single node or one-rank nodes (no set needed)."""
    local = env_local_size()
    if local is None or not 1 < local < world or world % local:
        return []
    return [hvd.ProcessSet(ranks) for ranks in uniform_groups(world, local)]


def not_one_job(env: LaunchEnv, what: str) -> ConfigError:
    """The launcher started ``env.world`` tasks that did not join one Horovod job: e.g. srun without (or
    with the wrong) --mpi plugin, where every task initialises MPI alone and would train on its own, all of
    them writing the same out_dir."""
    return ConfigError(
        f"{what} but {env.launcher} launched {env.world} tasks: the tasks did not join one job. Under srun "
        "pass the --mpi plugin your MPI was built for (slurm/pretrain.sh: PHOTOZ_SRUN_MPI, default pmix), use "
        "mpirun/horovodrun, or dist.backend=torch")


def call_site(skip: str = __file__) -> str:
    """``module.function.line`` of the nearest caller outside the file ``skip`` (a stable collective name)."""
    f = sys._getframe(1)
    while f is not None and f.f_code.co_filename == skip:
        f = f.f_back
    if f is None:
        return "unknown"
    return f"{os.path.splitext(os.path.basename(f.f_code.co_filename))[0]}.{f.f_code.co_name}.{f.f_lineno}"


class HorovodComm(Heartbeat, Comm):
    """Horovod (MPI or Gloo controller, NCCL on GPU): hvd.DistributedOptimizer averages gradients."""

    name = "horovod"

    def __init__(self, timeout_s: float, device_type: str, env: LaunchEnv | None = None,
                 node_groups: bool = False) -> None:
        super().__init__()
        # Stall detection turns a dead/hung peer into an error instead of a silent hang.
        os.environ.setdefault("HOROVOD_STALL_CHECK_TIME_SECONDS", str(max(5, int(timeout_s // 4))))
        os.environ.setdefault("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", str(max(10, int(timeout_s))))
        import horovod.torch as hvd

        self.hvd = hvd
        env = detect_env() if env is None else env
        node_sets = node_process_sets(hvd, env.world) if node_groups else []
        try:
            hvd.init(process_sets=node_sets)
        except ValueError as exc:  # a process set with ranks Horovod does not have: not one job
            raise not_one_job(env, f"hvd.init failed with process sets {[ps.ranks for ps in node_sets]}") from exc
        self.rank, self.local_rank, self.world = hvd.rank(), hvd.local_rank(), hvd.size()
        if env.world > 1 and self.world != env.world:
            hvd.shutdown()
            raise not_one_job(env, f"Horovod connected {self.world} rank(s)")
        if device_type == "cuda":
            torch.cuda.set_device(cuda_device_index(self.local_rank))
        if node_groups:
            self._init_node_set(node_sets)
        else:
            self._node_set, self.node_error = hvd.global_process_set, NO_NODE_GROUPS
        self._start_heartbeat(timeout_s)

    def _init_node_set(self, node_sets: list) -> None:
        """Our node's process set for ``allgather_node``: the one made at ``hvd.init`` with our node's ranks
        (as Horovod reports local ranks); a single node uses the global set, one-rank nodes need none."""
        groups = self._find_node()
        self._node_set = self.hvd.global_process_set
        if groups is None or not 1 < self.node_size < self.world:
            return
        mine = next(g for g in groups if self.rank in g)
        self._node_set = next((ps for ps in node_sets if ps.ranks == mine), None)
        if self._node_set is None:
            self.node_error = (
                f"Horovod takes its process sets at hvd.init, but the launch environment did not state the "
                f"{self.node_size} ranks per node ({', '.join(LOCAL_SIZE_VARS)} or SLURM_STEP_TASKS_PER_NODE)")

    def _kv_url(self, key: str) -> str:
        # horovodrun --gloo's rendezvous server (a plain HTTP key-value store); absent under mpirun
        addr, port = os.environ["HOROVOD_GLOO_RENDEZVOUS_ADDR"], os.environ["HOROVOD_GLOO_RENDEZVOUS_PORT"]
        return f"http://{addr}:{port}/photoz_heartbeat/{key}"

    def _kv_set(self, key, value):
        req = urllib.request.Request(self._kv_url(key), data=value.encode(), method="PUT")
        urllib.request.urlopen(req, timeout=5).close()

    def _kv_get(self, key):
        try:
            with urllib.request.urlopen(self._kv_url(key), timeout=5) as resp:
                return resp.read().decode()
        except urllib.error.HTTPError:
            return None

    @staticmethod
    def _name(kind: str, t: torch.Tensor | None = None, gather: bool = False) -> str:
        """The same name for every call from one call site and tensor signature (shape -- without the first
        dimension for gathers, which may differ between ranks -- and dtype), so that Horovod's response cache
        knows the collective from the second step on instead of negotiating it afresh each time. Every rank
        issues the same sequence of these synchronous collectives, so names match across ranks and one name
        is never in flight twice."""
        sig = ""
        if t is not None:
            shape = t.shape[1:] if gather else t.shape
            sig = "." + "x".join(map(str, shape)) + "." + str(t.dtype).split(".")[-1]
        return f"photoz.{kind}.{call_site()}{sig}"

    def allreduce(self, t, op="sum"):
        hvd = self.hvd
        t = t.detach().contiguous()
        if op in ("max", "min"):  # via allgather: portable across Horovod builds and dtypes
            g = self._allgather(t.unsqueeze(0), f"allreduce_{op}")
            return g.amax(0) if op == "max" else g.amin(0)
        hop = hvd.Sum if op == "sum" else hvd.Average
        return self._timed(hvd.allreduce, t, op=hop, name=self._name("allreduce", t))

    def allgather(self, t):
        return self._allgather(t, "allgather")

    def allgather_node(self, t):
        self._check_node()
        if self.node_size == 1:
            return t.detach().clone()
        t = t.detach().contiguous()
        return self._timed(self.hvd.allgather, t, name=self._name("allgather_node", t, gather=True),
                           process_set=self._node_set)

    def _allgather(self, t, kind):
        t = t.detach().contiguous()
        return self._timed(self.hvd.allgather, t, name=self._name(kind, t, gather=True))

    def allgather_object(self, obj):
        return self._timed(self.hvd.allgather_object, obj, name=self._name("allgather_object"))

    def broadcast_object(self, obj, root=0):
        return self._timed(self.hvd.broadcast_object, obj, root, name=self._name("broadcast_object"))

    def wrap_optimizer(self, optimizer, model):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        # channels_last gradients reach Horovod as contiguous views of their own memory (HorovodViews)
        return self.hvd.DistributedOptimizer(optimizer, named_parameters=named, op=self.hvd.Average,
                                             compression=HorovodViews)

    def broadcast_state(self, model, optimizer, ignore_buffers):
        state = {k: horovod_view(v) for k, v in model.state_dict().items() if k not in ignore_buffers}
        self.hvd.broadcast_parameters(state, root_rank=0)
        # hvd.broadcast_optimizer_state initialises an empty state by stepping with zero gradients,
        # which applies weight decay and seeds momentum buffers: only broadcast a non-empty state.
        if optimizer.state_dict()["state"]:
            self.hvd.broadcast_optimizer_state(optimizer, root_rank=0)

    def shutdown(self):
        self._stop_heartbeat()
        self.hvd.shutdown()
