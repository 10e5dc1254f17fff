"""What every training command sets up around its task: device, CPU threads, RNG state, communicator.

``run_with_comm(cfg, comm, body, hold)`` installs the pre-emption handler first and restores it last (a
SIGTERM/SIGUSR1 during start-up or the final save only sets the flag), resolves the device, sizes the
CPU thread pool, creates (and shuts down) the communicator, holds the run's output directory (``hold``, see
``photoz_hpc.run_lock``: refused on every rank before any write if another run holds it; released when
``body`` returns, a pre-empted return included, so a requeued job resumes at once) and calls
``body(cfg, comm, device, flag)``.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from photoz_hpc.comm.base import Comm
from photoz_hpc.comm.devices import cuda_device_index, gpu_or_cpu
from photoz_hpc.comm.nodes import env_local_size, node_groups
from photoz_hpc.comm.select import init_comm
from photoz_hpc.errors import PhotozError
from photoz_hpc.launch_env import detect_env
from photoz_hpc.logs import get_logger
from photoz_hpc.run_lock import RunDir, hold_for_ranks
from photoz_hpc.train.signals import PreemptionFlag

log = get_logger(__name__)

def resolve_device(requested: str, local_rank: int) -> torch.device:
    """The rank's device for ``train.device`` ('cuda', 'auto' or 'cpu'); 'cuda' without a CUDA device runs on the CPU
    with a WARNING (``comm.devices.gpu_or_cpu``; given on the command line it was refused before: ``cli``)."""
    requested = gpu_or_cpu("train.device", requested)
    if requested in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda", cuda_device_index(local_rank))
    return torch.device("cpu")


def set_cpu_threads(cfg, device: torch.device) -> int:
    """Intra-op threads for CPU training. Oversubscribing cores (ranks x threads + loader threads)
    makes OpenMP spin-wait and can cost 4x on a small or shared host, so 'auto' divides the cores
    among the node's ranks and the loader's threads. OMP_NUM_THREADS, when set, wins."""
    if device.type != "cpu":
        return torch.get_num_threads()
    n = cfg.train.cpu_threads
    if n == 0:
        if "OMP_NUM_THREADS" in os.environ:
            return torch.get_num_threads()
        local = env_local_size() or 1  # ranks sharing this node's cores
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        n = max(1, cores // max(local, 1) - cfg.loader.num_threads)
    torch.set_num_threads(n)
    return n


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """This process's RNG streams as plain data (tensors, lists, numbers: checkpoints load with weights_only=True).
    ``device``: the rank's CUDA device, whose generator alone is saved (``cuda``: one state). Not every visible GPU's: a resume that sees fewer GPUs (``srun --gpus-per-task=1`` after torchrun)
    would have nowhere to put the others."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)}}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore ``rng_state()``; also the numpy tuple of older checkpoints (its key array read as a tensor). The
    saved CUDA state goes to ``device`` (the rank's own GPU) only; see ``_own_cuda_state`` for older checkpoints."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(_numpy_state(state["numpy"]))
    random.setstate(state["python"])
    if device is not None and device.type == "cuda" and state.get("cuda") is not None:
        own = _own_cuda_state(state["cuda"])
        if own is not None:
            torch.cuda.set_rng_state(own, device)


def _own_cuda_state(saved: Any) -> torch.Tensor | None:
    """The saved state of the rank's own GPU. Older checkpoints hold one state per GPU visible at save time
    (``get_rng_state_all``), and the rank used entry ``local_rank % len`` then (``comm/devices.py``), which holds
    for the same launch layout (the RNG is restored only for the same world size)."""
    if isinstance(saved, torch.Tensor):
        return saved
    if isinstance(saved, (list, tuple)) and saved and all(isinstance(t, torch.Tensor) for t in saved):
        return saved[detect_env().local_rank % len(saved)]
    log.warning("checkpoint's CUDA RNG state is not a state or a list of states (%s): the GPU's random stream "
                "restarts", type(saved).__name__)
    return None


def _numpy_state(saved: Any) -> tuple[str, np.ndarray, int, int, float]:
    if isinstance(saved, dict):
        saved = (saved["kind"], saved["key"], saved["pos"], saved["has_gauss"], saved["cached_gaussian"])
    kind, key, pos, has_gauss, gauss = saved
    key = key.numpy() if isinstance(key, torch.Tensor) else np.asarray(key)
    return str(kind), key.astype(np.uint32), int(pos), int(has_gauss), float(gauss)


def data_ranks_per_node(cfg, comm: Comm) -> int | None:
    """Ranks per node for the training loader's node partitions (``data.partition: node``), None for ``global``.
    A collective (every rank's local rank, gathered): nodes must be blocks of consecutive ranks of one size,
    whatever the backend; otherwise the deal would not match what ``photoz-hpc stage`` copied to each node, so
    that is an error on every rank alike (no rank goes on to hang in a collective), not a guess."""
    if cfg.data.partition != "node":
        return None
    if comm.world == 1:
        return 1
    try:
        groups = node_groups(comm.allgather_object(comm.local_rank))
    except PhotozError as exc:
        raise PhotozError(f"rank {comm.rank}: data.partition=node needs the node layout: {exc}") from None
    return len(groups[0])


def prepare_device(device: torch.device) -> None:
    """A GPU run (any backend, ``none`` too): make ``device`` the current CUDA device, on which the loaders
    allocate, and let cuDNN pick the fastest kernels for training's fixed shapes. A CPU run: nothing."""
    if device.type != "cuda":
        return
    torch.cuda.set_device(device)
    torch.backends.cudnn.benchmark = True


def use_channels_last(cfg, device: torch.device) -> bool:
    """Whether the network runs channels_last: ``model.channels_last`` 'auto' on GPUs only, true/false on
    every device and backend (Horovod is handed contiguous NHWC-ordered views of channels_last tensors, dist.py)."""
    setting = cfg.model.channels_last
    return device.type == "cuda" if setting == "auto" else bool(setting)


def memory_format_name(channels_last: bool) -> str:
    """What the run's log line and summary call the memory format."""
    return "channels_last" if channels_last else "contiguous"


def run_with_comm(cfg, comm: Comm | None, body: Callable[..., dict[str, Any]], hold: RunDir | None = None,
                  interrupt: bool = False) -> dict[str, Any]:
    """Set up device, threads and communicator, and hold the output directory ``hold``, around
    ``body(cfg, comm, device, flag)``. ``interrupt``: a first Ctrl-C only sets the flag too (training runs).
    torch's thread count is the process's again afterwards: a run called from Python (a notebook, a test) leaves
    no global state behind for what comes next."""
    flag = PreemptionFlag(interrupt).install()
    threads_before = torch.get_num_threads()
    try:
        env = detect_env()
        device = resolve_device(cfg.train.device, env.local_rank)
        prepare_device(device)
        threads = set_cpu_threads(cfg, device)
        log.debug("torch intra-op threads: %d", threads)
        own = comm is None
        want_node_groups = getattr(getattr(cfg, "moco", None), "bn_mode", None) == "shuffle-node"
        comm = comm or init_comm(cfg.dist.backend, cfg.dist.timeout_s, device.type, want_node_groups)
        try:
            with hold_for_ranks(comm, hold):
                return body(cfg, comm, device, flag)
        finally:
            if own:
                comm.shutdown()
    finally:
        torch.set_num_threads(threads_before)
        flag.restore()
