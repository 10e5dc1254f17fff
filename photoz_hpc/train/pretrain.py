"""The pretraining loop: ``run_pretrain(cfg) -> summary``.

``Trainer`` owns the model, optimiser, precision and one ``train_step``; ``run_pretrain`` adds the
loader, resume, checkpoints, pre-emption, metrics and the progress bar. Every rank runs the same
sequence of collectives; rank 0 alone writes files.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from photoz_hpc.config import Config, save_config
from photoz_hpc.errors import ConfigError, PhotozError
from photoz_hpc.io_utils import atomic_write_json
from photoz_hpc.logs import get_logger
from photoz_hpc.models.export import export_encoder
from photoz_hpc.models.moco import build_moco
from photoz_hpc.models.momentum import momentum_at
from photoz_hpc.models.queue import shard_queue, unshard_queue
from photoz_hpc.train.checkpoint import checkpoint_dir, find_latest_valid, load_checkpoint, save_checkpoint
from photoz_hpc.train.dist import Comm, cuda_device_index, detect_env, init_comm
from photoz_hpc.train.metrics_log import MetricsLog
from photoz_hpc.train.optim import build_optimizer, lr_at, set_lr
from photoz_hpc.train.precision import backward_and_step, resolve_precision
from photoz_hpc.train.signals import PreemptionFlag, Watchdog

log = get_logger(__name__)

QUEUE_BUFFERS = ["queue", "queue_ptr"]


def resolve_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device 'cuda' but no CUDA device is available (use 'auto' or 'cpu')")
    if requested in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda", cuda_device_index(local_rank))
    return torch.device("cpu")


_LOCAL_SIZE_VARS = ("LOCAL_WORLD_SIZE", "HOROVOD_LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS")


def set_cpu_threads(cfg: Config, device: torch.device) -> int:
    """Intra-op threads for CPU training. Oversubscribing cores (ranks x threads + loader threads)
    makes OpenMP spin-wait and can cost 4x on a small or shared host, so 'auto' divides the cores
    among the node's ranks and the loader's threads. OMP_NUM_THREADS, when set, wins."""
    if device.type != "cpu":
        return torch.get_num_threads()
    n = cfg.train.cpu_threads
    if n == 0:
        if "OMP_NUM_THREADS" in os.environ:
            return torch.get_num_threads()
        local = next((int(os.environ[v]) for v in _LOCAL_SIZE_VARS if os.environ.get(v, "").isdigit()), 1)
        slurm = os.environ.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
        local = int(slurm) if local == 1 and slurm.isdigit() else local
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        n = max(1, cores // max(local, 1) - cfg.loader.num_threads)
    torch.set_num_threads(n)
    return n


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def local_queue_ptr(global_ptr: int, queue_size: int, world: int, batch: int, mode: str) -> int:
    """This rank's ``queue_ptr`` for a checkpoint's replicated-layout pointer ``global_ptr``.

    Every step enqueues a whole block of ``world x batch`` keys, so the pointer must sit on a block
    boundary of *this* run's layout. A checkpoint written with another world x batch may point inside
    such a block: the pointer is then aligned down to the block start, i.e. the newest (partial) block
    of keys is overwritten first, and the slots after the old pointer keep their (older) keys longer.
    """
    block = world * batch
    gptr = global_ptr % queue_size
    gptr -= gptr % block
    return gptr if mode == "replicated" else gptr // world


class Trainer:
    """Model + optimiser + one MoCo step, wired to a communicator."""

    def __init__(self, cfg: Config, comm: Comm, device: torch.device, steps_per_epoch: int) -> None:
        self.cfg, self.comm, self.device = cfg, comm, device
        self.batch = cfg.loader.batch_size
        self.global_batch = self.batch * comm.world
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
        self.channels_last = device.type == "cuda" and cfg.model.channels_last
        torch.manual_seed(cfg.seed)  # identical initial weights everywhere (and broadcast anyway)
        model = build_moco(cfg, comm).to(device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.ignore = [] if cfg.moco.queue_mode == "replicated" else list(QUEUE_BUFFERS)
        self.precision = resolve_precision(cfg.train.precision, device)
        optimizer = build_optimizer(model.encoder_q, cfg.optim)
        comm.broadcast_state(model, optimizer, self.ignore)
        self.net = comm.wrap_model(model, device, self.ignore)
        self.optimizer = comm.wrap_optimizer(optimizer, model)
        self.params = [p for p in model.encoder_q.parameters() if p.requires_grad]
        self.step = 0

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def train_step(self, view1: torch.Tensor, view2: torch.Tensor) -> dict[str, Any]:
        """One optimisation step on this rank's batch; returns local loss/acc tensors, lr, momentum."""
        cfg, step = self.cfg, self.step
        lr = lr_at(step, self.total_steps, self.steps_per_epoch, self.global_batch, cfg.optim)
        set_lr(self.optimizer, lr)
        m = momentum_at(step, self.total_steps, cfg.moco.momentum, cfg.moco.momentum_schedule)
        self.optimizer.zero_grad()  # set_to_none by default (Horovod takes no argument)
        with self.precision.autocast():
            out = self.net(self._prep(view1), self._prep(view2), momentum=m, shuffle_seed=cfg.seed * 1_000_003 + step)
        backward_and_step(out["loss"], self.optimizer, self.precision, self.params, cfg.optim.grad_clip,
                          horovod=self.comm.name == "horovod")
        self.step += 1
        return {"loss": out["loss"].detach(), "acc": out["acc"], "lr": lr, "momentum": m}

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_state(self, loader=None) -> dict[str, Any] | None:
        """Collective: gathers every rank's queue shard, RNG and loader state; the dict on rank 0 only."""
        comm, model = self.comm, self.model
        replicated = self.cfg.moco.queue_mode == "replicated"
        queue = model.queue.detach()
        shards = queue.unsqueeze(0) if (replicated or comm.world == 1) else comm.allgather(queue.unsqueeze(0))
        rngs = comm.allgather_object(_rng_state())
        loaders = comm.allgather_object(loader.state_dict() if loader is not None else None)
        if comm.rank != 0:
            return None
        ptr = int(model.queue_ptr.item())
        return {
            # copies: the dict must not change if training continues before it is written
            "model": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items() if k not in QUEUE_BUFFERS},
            "queue": shards.to("cpu", copy=True),
            "queue_ptr_global": ptr if replicated else ptr * comm.world,
            "queue_mode": self.cfg.moco.queue_mode,
            "world": comm.world,
            "batch_size": self.batch,
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "scaler": self.precision.scaler.state_dict() if self.precision.scaler is not None else None,
            "schedule": {"total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch,
                         "global_batch": self.global_batch},
            "rng": rngs,
            "loader": loaders,
            "config": dataclasses.asdict(self.cfg),
        }

    def load_state(self, state: dict[str, Any], loader=None) -> bool:
        """Restore from a checkpoint dict (every rank loads the same file and takes its part).
        Returns whether the loader's position was restored (same world size and batch)."""
        comm, model = self.comm, self.model
        missing, unexpected = model.load_state_dict(state["model"], strict=False)
        if set(missing) - set(QUEUE_BUFFERS) or unexpected:
            raise PhotozError(f"checkpoint does not match the model (missing {missing[:5]}, unexpected {unexpected[:5]}); "
                              "was it written with a different model.arch/width/stem_kernel?")
        mode, saved_mode = self.cfg.moco.queue_mode, state["queue_mode"]
        shards, saved_world, saved_batch = state["queue"], state["world"], state["batch_size"]
        if mode != "replicated" and saved_mode != "replicated" and saved_world == comm.world and saved_batch == self.batch:
            mine = shards[comm.rank]
        else:
            full = shards[0] if saved_mode == "replicated" else unshard_queue(list(shards), saved_batch)
            mine = full if mode == "replicated" else shard_queue(full, comm.rank, comm.world, self.batch)
        if mine.shape != model.queue.shape:
            raise PhotozError(f"checkpoint queue {tuple(mine.shape)} does not fit this run's {tuple(model.queue.shape)} "
                              "(moco.queue_size or embed_dim changed)")
        with torch.no_grad():
            model.queue.copy_(mine)
            model.queue_ptr.fill_(local_queue_ptr(int(state["queue_ptr_global"]), self.cfg.moco.queue_size,
                                                  comm.world, self.batch, mode))
        self.optimizer.load_state_dict(state["optimizer"])
        if self.precision.scaler is not None and state.get("scaler"):
            self.precision.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        same_layout = saved_world == comm.world and saved_batch == self.batch
        if same_layout:
            _set_rng_state(state["rng"][comm.rank])
            if loader is not None and state["loader"][comm.rank] is not None:
                loader.load_state_dict(state["loader"][comm.rank])
                return True
        else:
            log.warning("checkpoint was written by %d ranks x batch %d, now %d x %d: queue re-sharded, but the "
                        "data order and RNG streams restart (resume is not bit-exact)",
                        saved_world, saved_batch, comm.world, self.batch)
        return False


# ---------------------------------------------------------------------- the run


def _build_loader(cfg: Config, comm: Comm):
    from photoz_hpc.data import open_dataset

    try:
        from photoz_hpc.augment.loaders import build_loader
    except ImportError as exc:
        raise PhotozError(f"the data loaders (photoz_hpc.augment.loaders) are not available: {exc}") from None
    dataset = open_dataset(cfg.data.path)
    return build_loader(cfg, dataset, pipeline="pretrain", rank=comm.rank, world_size=comm.world, seed=cfg.seed,
                        device=None)


def run_pretrain(cfg: Config, loader=None, comm: Comm | None = None) -> dict[str, Any]:
    """Pretrain MoCo v2 per ``cfg`` on this rank; returns the run summary (same dict on every rank,
    file paths meaningful on rank 0). ``summary['preempted']`` is True after a SIGTERM/SIGUSR1 stop.

    The SIGTERM/SIGUSR1 handler is installed first and restored last: a signal during start-up (loader,
    checkpoint load) or after the loop (final save, export, summary) only sets the flag, so the run
    still ends with a checkpoint (or, with nothing trained yet, a clean pre-empted exit) instead of
    being killed."""
    flag = PreemptionFlag().install()
    try:
        env = detect_env()
        device = resolve_device(cfg.train.device, env.local_rank)
        threads = set_cpu_threads(cfg, device)
        log.debug("torch intra-op threads: %d", threads)
        own = comm is None
        comm = comm or init_comm(cfg.dist.backend, cfg.dist.timeout_s, device.type)
        try:
            return _run(cfg, comm, device, loader, flag)
        finally:
            if own:
                comm.shutdown()
    finally:
        flag.restore()


def _run(cfg: Config, comm: Comm, device: torch.device, loader, flag: PreemptionFlag) -> dict[str, Any]:
    from tqdm import tqdm

    rank0, world = comm.rank == 0, comm.world
    out_dir = Path(cfg.out_dir)
    if rank0:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir)
    if loader is None:
        loader = _build_loader(cfg, comm)
    spe = len(loader)
    if spe < 1:
        raise ConfigError(f"the dataset yields no full global batch of {world} x {cfg.loader.batch_size}")
    trainer = Trainer(cfg, comm, device, spe)
    ckdir = checkpoint_dir(out_dir)

    # ---- resume
    state, path, loader_restored = None, None, False
    if cfg.train.resume == "auto":
        if rank0:
            path, state = find_latest_valid(ckdir, "pretrain")
        path = comm.broadcast_object(str(path) if path else None)
        if path and not rank0:
            state = load_checkpoint(path, "pretrain")
    elif cfg.train.resume not in ("never", "none"):
        path, state = cfg.train.resume, load_checkpoint(cfg.train.resume, "pretrain")
    if state is not None:
        loader_restored = trainer.load_state(state, loader)
        log.info("resumed from %s at step %d", path, trainer.step)
    start_step, total = trainer.step, trainer.total_steps

    watchdog = None
    if cfg.dist.watchdog and world > 1:
        watchdog = Watchdog(cfg.dist.timeout_s, comm.rank)
        watchdog.start()
    metrics = MetricsLog(out_dir, enabled=rank0, tensorboard=cfg.train.tensorboard)
    bar = tqdm(total=total, initial=start_step, disable=not (rank0 and cfg.train.progress), desc="pretrain",
               dynamic_ncols=True, leave=True)
    log.info("pretraining %s/%s: %d ranks (%s) x batch %d, queue %d (%s), %s, %d steps (%d per epoch) on %s",
             cfg.model.arch, cfg.model.width, world, comm.name, cfg.loader.batch_size, cfg.moco.queue_size,
             cfg.moco.queue_mode, trainer.precision.name, total, spe, device)

    losses: list[float] = []
    times = {"data_s": 0.0, "compute_s": 0.0, "comm_s": 0.0, "step_s": 0.0}
    measured_steps, last_ckpt = 0, None
    # a signal during start-up: agree on it before the first step (ranks may differ)
    preempted = bool(comm.allreduce(torch.tensor([float(flag.raised)], dtype=torch.float64).to(device), "max")
                     .cpu()[0] > 0)
    saved_step = start_step if state is not None else -1
    epoch = trainer.step // spe
    mid_epoch = loader_restored and trainer.step % spe != 0
    try:
        while trainer.step < total and not preempted:
            if not mid_epoch:
                loader.set_epoch(epoch)
            mid_epoch = False
            it = iter(loader)
            while trainer.step < total:
                t0 = time.perf_counter()
                try:
                    batch = next(it)
                except StopIteration:
                    epoch += 1
                    break
                t1 = time.perf_counter()
                c0 = comm.comm_seconds
                res = trainer.train_step(batch["view1"], batch["view2"])
                # loss, accuracy and the preemption flag in one device tensor: one all-reduce, one host sync
                loss_t = res["loss"].reshape(())
                local = torch.stack([loss_t.to(torch.float64), res["acc"].reshape(()).to(torch.float64),
                                     torch.full((), float(flag.raised), dtype=torch.float64, device=loss_t.device)])
                red = comm.allreduce(local, "sum").cpu()
                t2 = time.perf_counter()
                step = trainer.step
                loss, acc, preempted = float(red[0]) / world, float(red[1]) / world, bool(red[2] > 0)
                if not np.isfinite(loss):
                    raise PhotozError(f"loss became {loss} at step {step}; lower optim.lr or use fp32/bf16")
                losses.append(loss)
                comm_s = comm.comm_seconds - c0
                st = {"data_s": t1 - t0, "comm_s": comm_s, "compute_s": t2 - t1 - comm_s, "step_s": t2 - t0}
                if step - start_step > 2:  # skip warm-up steps in throughput figures
                    measured_steps += 1
                    for k, v in st.items():
                        times[k] += v
                if watchdog is not None:
                    watchdog.beat(step)
                img_s = trainer.global_batch / st["step_s"]
                if rank0 and (step % cfg.train.log_every == 0 or step == start_step + 1 or step == total):
                    metrics.log(step, {"epoch": epoch, "loss": loss, "acc": acc, "lr": res["lr"],
                                       "momentum": res["momentum"], "img_per_s": img_s,
                                       "data_wait_frac": st["data_s"] / st["step_s"], **st})
                bar.update(1)
                bar.set_postfix(ep=epoch, loss=f"{loss:.3f}", img_s=f"{img_s:.0f}",
                                wait=f"{100 * st['data_s'] / st['step_s']:.0f}%", refresh=False)
                if preempted:
                    break
                if step % cfg.train.checkpoint_every == 0 and step < total:
                    last_ckpt, saved_step = _save(trainer, loader, ckdir, cfg), step
    except Exception as exc:
        hint = ""
        if world > 1 and isinstance(exc, RuntimeError) and not isinstance(exc, PhotozError):
            hint = (" -- if this is a communication error, another rank probably died or hung: its own log "
                    "lines (tagged [rank N]) or the launcher's exit report name it")
        log.error("rank %d failed at step %d: %s: %s%s", comm.rank, trainer.step + 1, type(exc).__name__, exc, hint)
        raise
    finally:
        bar.close()
        if watchdog is not None:
            watchdog.stop()

    if trainer.step != saved_step and not (preempted and trainer.step == 0):  # nothing trained: nothing to save
        last_ckpt = _save(trainer, loader, ckdir, cfg)
    elif last_ckpt is None and path:
        last_ckpt = Path(path)
    encoder_path = None
    if rank0 and cfg.train.export_encoder and not preempted:
        encoder_path = export_encoder({"model": trainer.model.state_dict(), "step": trainer.step,
                                       "config": {"model": dataclasses.asdict(cfg.model)}}, out_dir / "encoder.pt")
    metrics.close()
    mt = max(measured_steps, 1)
    first_loss, last_loss, fill = _loss_window(losses, cfg.moco.queue_size, trainer.global_batch, start_step)
    step_s = times["step_s"] / mt if measured_steps else float("nan")
    summary = {
        "steps": trainer.step,
        "start_step": start_step,
        "total_steps": total,
        "preempted": preempted,
        "first_loss": first_loss,
        "last_loss": last_loss,
        "first_step_loss": losses[0] if losses else None,
        "queue_fill_steps": fill,
        "img_per_s": trainer.global_batch / step_s if measured_steps else None,
        "step_time_s": {k: v / mt for k, v in times.items()} if measured_steps else None,
        "data_wait_frac": times["data_s"] / times["step_s"] if measured_steps else None,
        "world_size": world,
        "backend": comm.name,
        "precision": trainer.precision.name,
        "device": str(device),
        "global_batch": trainer.global_batch,
        "checkpoint": str(last_ckpt) if last_ckpt else None,
        "metrics": str(metrics.path),
        "tensorboard": str(out_dir / "tensorboard") if cfg.train.tensorboard else None,
        "encoder": str(encoder_path) if encoder_path else None,
        "out_dir": str(out_dir),
    }
    if rank0:
        atomic_write_json(out_dir / "summary.json", summary)
        log.info("summary: %s", json.dumps(summary))
    return summary


def _loss_window(losses: list[float], queue_size: int, global_batch: int, start_step: int):
    """(first, last, fill): mean loss over a window once the queue holds only real keys, and over the
    last window. Before the random initial keys are flushed (``fill`` steps) the negatives are trivially
    easy and the loss is artificially low, so comparing against step 1 would hide the learning."""
    if not losses:
        return None, None, None
    fill = -(-queue_size // global_batch)
    skip = max(0, fill - start_step)
    if len(losses) <= skip:
        return losses[0], losses[-1], fill
    tail = losses[skip:]
    w = max(1, min(10, len(tail) // 5))
    return sum(tail[:w]) / w, sum(tail[-w:]) / w, fill


def _save(trainer: Trainer, loader, ckdir: Path, cfg: Config) -> Path | None:
    state = trainer.checkpoint_state(loader)
    path = None
    if state is not None:
        path = save_checkpoint(ckdir, trainer.step, {"task": "pretrain", **state}, keep=cfg.train.keep_checkpoints)
        log.info("checkpoint %s", path)
    path = trainer.comm.broadcast_object(str(path) if path else None)
    return Path(path) if path else None
