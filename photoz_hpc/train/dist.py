"""One small communication interface with ``none``, ``torch`` and ``horovod`` implementations.

Interface: ``rank``, ``local_rank``, ``world``, ``allreduce(t, op)``, ``allgather(t)``,
object variants (``allgather_object``, ``broadcast_object``), plus the three hooks the trainer needs
(``wrap_model``, ``wrap_optimizer``, ``broadcast_state``). Collectives return new tensors and
accumulate their wall time in ``comm_seconds`` (step timing for benchmarks).

Rank/world come from torchrun, horovodrun, Open MPI or Slurm variables alike (``detect_env``).

Failure diagnosis: every rank counts the explicit collectives it has entered (``calls``) and a daemon
thread publishes the count to a side channel that does not need the (possibly blocked) collectives --
the c10d store for ``torch``, horovodrun's rendezvous key-value server for ``horovod --gloo``. When a
collective fails or times out, or the no-progress watchdog fires, ``peer_report()`` compares the counts
and names the rank(s) that never reached the collective the others are waiting in.
"""

from __future__ import annotations

import datetime
import os
import sys
import threading
import time
import urllib.error
import urllib.request
import warnings
from typing import Any

import torch
from torch import nn

from photoz_hpc.errors import ConfigError, PhotozError
from photoz_hpc.launch_env import _ENV_SOURCES, LaunchEnv, detect_env  # noqa: F401  (re-exported)
from photoz_hpc.logs import get_logger
from photoz_hpc.train import signals

log = get_logger(__name__)


class CollectiveError(RuntimeError):
    """A collective failed or timed out; the message says which rank(s) did not respond, when known."""


def cuda_device_index(local_rank: int) -> int:
    """The CUDA device this rank uses: ``local_rank % device_count()``. With per-task GPU binding
    (``srun --gpus-per-task=1``, ``--gpu-bind``) every task sees one device, index 0, whatever its
    local rank; with all the node's GPUs visible it is the local rank. Used for every device choice."""
    n = torch.cuda.device_count()
    if n < 1:
        raise PhotozError("CUDA was requested but no CUDA device is visible to this process")
    return local_rank % n


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


_DIST_FILE = __file__


def call_site(skip: str = _DIST_FILE) -> str:
    """``module.function.line`` of the nearest caller outside the file ``skip`` (a stable collective name)."""
    f = sys._getframe(1)
    while f is not None and f.f_code.co_filename == skip:
        f = f.f_back
    if f is None:
        return "unknown"
    return f"{os.path.splitext(os.path.basename(f.f_code.co_filename))[0]}.{f.f_code.co_name}.{f.f_lineno}"


def horovod_available() -> bool:
    try:
        import horovod.torch  # noqa: F401
    except Exception:  # ImportError, or a Horovod built against another torch
        return False
    return True


class Comm:
    """Serial implementation (``none``) and base class."""

    name = "none"

    def __init__(self) -> None:
        self.rank, self.local_rank, self.world = 0, 0, 1
        self.comm_seconds = 0.0
        self.calls = 0  # explicit collectives entered (same sequence on every rank)
        self.timeout_s = 0.0
        self._hb_stop = threading.Event()
        self._hb_thread: threading.Thread | None = None

    # -- tensors
    def allreduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if op not in ("sum", "mean", "max", "min"):
            raise ValueError(f"unknown reduce op '{op}'")
        return t.clone()

    def allgather(self, t: torch.Tensor) -> torch.Tensor:
        return t.clone()

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

    def shutdown(self) -> None:
        self._stop_heartbeat()

    # -- failure diagnosis: a side channel that works while the collectives are blocked
    def _kv_set(self, key: str, value: str) -> None:
        raise NotImplementedError

    def _kv_get(self, key: str) -> str | None:
        raise NotImplementedError

    def _start_heartbeat(self, timeout_s: float) -> None:
        """Publish ``calls`` every few seconds from a daemon thread (the main thread may be stuck)."""
        self.timeout_s = timeout_s
        if self.world < 2:
            return
        try:
            self._kv_set(f"hb{self.rank}", str(self.calls))
        except Exception as exc:  # no side channel (e.g. plain mpirun): reports say the rank is unknown
            log.debug("no heartbeat channel: %s", exc)
            return
        interval = min(max(timeout_s / 10, 0.5), 30.0)

        def beat() -> None:
            last = -1
            while not self._hb_stop.wait(interval):
                if self.calls != last:
                    try:
                        self._kv_set(f"hb{self.rank}", str(self.calls))
                        last = self.calls
                    except Exception:  # the store's host is gone: nothing left to report to
                        return

        self._hb_thread = threading.Thread(target=beat, daemon=True, name="photoz-heartbeat")
        self._hb_thread.start()
        signals.set_peer_report(self.peer_report)

    def _stop_heartbeat(self) -> None:
        self._hb_stop.set()
        if self._hb_thread is not None:
            self._hb_thread.join(timeout=5)
            self._hb_thread = None
        signals.set_peer_report(None)

    def peer_report(self) -> str:
        """Which ranks did not reach the collective this rank is in (best effort, never raises)."""
        if self._hb_thread is None:
            return "cannot tell which rank did not respond (no heartbeat channel)"
        counts: dict[int, int] = {self.rank: self.calls}
        missing = []
        for r in range(self.world):
            if r == self.rank:
                continue
            try:
                v = self._kv_get(f"hb{r}")
            except Exception:
                v = None
            if v is None:
                missing.append(r)
            else:
                counts[r] = int(v)
        top = max(counts.values())
        behind = sorted(r for r, c in counts.items() if c < top)
        parts = []
        if behind:
            mine = " (this rank)" if self.rank in behind else ""
            last = ", ".join(f"rank {r} at #{counts[r]}" for r in behind)
            parts.append(f"rank(s) {behind}{mine} did not respond: they never entered collective #{top} that "
                         f"rank(s) {sorted(r for r, c in counts.items() if c == top)} are waiting in ({last})")
        elif len(counts) > 1:
            parts.append(f"every reachable rank entered collective #{top}: the stall is in a gradient all-reduce "
                         "or the ranks issued different collectives")
        if missing:
            parts.append(f"no heartbeat from rank(s) {sorted(missing)} (dead, or their host is unreachable)")
        return "; ".join(parts)

    # -- helpers
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


class TorchComm(Comm):
    """torch.distributed: NCCL on GPU, Gloo on CPU; DDP for the gradients.

    MoCo/metric collectives run on their own process group so they can never interleave with
    DDP's bucketed all-reduces (they are issued from inside the autograd backward).
    """

    name = "torch"

    def __init__(self, env: LaunchEnv, timeout_s: float, device_type: str) -> None:
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
        self._start_heartbeat(timeout_s)

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
        t = t.detach().contiguous()
        out = torch.empty((self.world * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
        gather = getattr(self.dist, "all_gather_single", None) or self.dist.all_gather_into_tensor
        self._timed(gather, out, t, group=self.group)
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


class HorovodComm(Comm):
    """Horovod (MPI or Gloo controller, NCCL on GPU): hvd.DistributedOptimizer averages gradients."""

    name = "horovod"

    def __init__(self, timeout_s: float, device_type: str, env: LaunchEnv | None = None) -> None:
        super().__init__()
        # Stall detection turns a dead/hung peer into an error instead of a silent hang.
        os.environ.setdefault("HOROVOD_STALL_CHECK_TIME_SECONDS", str(max(5, int(timeout_s // 4))))
        os.environ.setdefault("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", str(max(10, int(timeout_s))))
        import horovod.torch as hvd

        self.hvd = hvd
        hvd.init()
        self.rank, self.local_rank, self.world = hvd.rank(), hvd.local_rank(), hvd.size()
        env = detect_env() if env is None else env
        if env.world > 1 and self.world != env.world:
            # e.g. srun without (or with the wrong) --mpi plugin: every task initialises MPI alone and
            # would train on its own, all of them writing the same out_dir.
            hvd.shutdown()
            raise ConfigError(
                f"Horovod connected {self.world} rank(s) but {env.launcher} launched {env.world} tasks: the tasks "
                "did not join one job. Under srun pass the --mpi plugin your MPI was built for (slurm/pretrain.sh: "
                "PHOTOZ_SRUN_MPI, default pmix), use mpirun/horovodrun, or dist.backend=torch")
        if device_type == "cuda":
            torch.cuda.set_device(cuda_device_index(self.local_rank))
        self._start_heartbeat(timeout_s)

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


def resolve_backend(requested: str, env: LaunchEnv) -> str:
    """``auto``: Horovod when launched by horovodrun/mpirun and importable, torch for other multi-rank
    launches, ``none`` for a single process."""
    if requested != "auto":
        return requested
    if env.launcher == "horovodrun" or (env.launcher in ("openmpi", "pmi", "slurm") and horovod_available()):
        return "horovod" if horovod_available() else "torch"
    return "torch" if env.world > 1 else "none"


def init_comm(backend: str = "auto", timeout_s: float = 600.0, device_type: str = "cpu") -> Comm:
    """Create the communicator for ``dist.backend``; errors say what is missing."""
    env = detect_env()
    backend = resolve_backend(backend, env)
    if backend == "none":
        if env.world > 1:
            raise ConfigError(f"dist.backend 'none' but launched as {env.world} ranks by {env.launcher}")
        return Comm()
    if backend == "horovod":
        if not horovod_available():
            raise ConfigError("dist.backend 'horovod' but 'import horovod.torch' fails: run launch/install_horovod.sh")
        return HorovodComm(timeout_s, device_type, env)
    if backend == "torch":
        return TorchComm(env, timeout_s, device_type)
    raise ConfigError(f"dist.backend '{backend}' is not one of ['auto', 'horovod', 'torch', 'none']")
