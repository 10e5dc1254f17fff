"""MoCo v2 pretraining as a task on the shared loop: ``run_pretrain(cfg) -> summary``.

``Trainer`` owns the model, optimiser, precision, one MoCo step, the queue-aware checkpoint state and
the encoder export; ``train.loop.run_loop`` owns the run (resume, checkpoints, pre-emption, metrics,
progress bar, summary). Every rank runs the same sequence of collectives; rank 0 alone writes files.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import torch

from photoz_hpc.comm.base import Comm
from photoz_hpc.config import Config
from photoz_hpc.errors import PhotozError
from photoz_hpc.logs import get_logger
from photoz_hpc.models.cpu_guards import check_cpu_channels_last
from photoz_hpc.models.export import export_moco_encoder
from photoz_hpc.models.moco import build_moco
from photoz_hpc.models.momentum import momentum_at
from photoz_hpc.models.queue import shard_queue, unshard_queue
from photoz_hpc.models.records import default_survey, survey_record
from photoz_hpc.survey import Survey
from photoz_hpc.train.optim import build_optimizer, lr_at, set_lr
from photoz_hpc.train.precision import backward_and_step, resolve_precision
from photoz_hpc.train.runtime import (
    data_ranks_per_node,
    memory_format_name,
    rng_state,
    set_rng_state,
    use_channels_last,
)
from photoz_hpc.train.surveys import loader_survey, resolve_run_config

log = get_logger(__name__)

QUEUE_BUFFERS = ["queue", "queue_ptr"]


def local_queue_ptr(global_ptr: int, queue_size: int, world: int, batch: int, mode: str) -> int:
    """This rank's ``queue_ptr`` for a checkpoint's replicated-layout pointer ``global_ptr``.

    Every step enqueues a whole block of ``world x batch`` keys, so the pointer must sit on a block
    boundary of *this* run's layout. A checkpoint written with another world x batch may point inside
    such a block: the pointer is then aligned down to the block start, i.e. the newest (partial) block
    of keys is overwritten first, and the slots after the old pointer keep their (older) keys longer.
    """
    block = world * batch
    ptr = global_ptr % queue_size
    ptr -= ptr % block
    return ptr if mode == "replicated" else ptr // world


class Trainer:
    """Model + optimiser + one MoCo step, wired to a communicator (the loop's ``pretrain`` task)."""

    kind = "pretrain"

    def __init__(self, cfg: Config, comm: Comm, device: torch.device, steps_per_epoch: int,
                 survey: Survey | None = None) -> None:
        self.cfg, self.comm, self.device = cfg, comm, device
        self.survey = survey or default_survey()  # the training data's: the stem reads its bands
        self.records = survey_record(self.survey)  # what checkpoints and encoder.pt record about the data
        cfg = self.cfg = resolve_run_config(cfg, self.survey)  # encoder.pt's view settings: concrete numbers
        self.batch = cfg.loader.batch_size
        self.global_batch = self.batch * comm.world
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
        self.channels_last = use_channels_last(cfg, device)
        self.memory_format = memory_format_name(self.channels_last)
        torch.manual_seed(cfg.seed)  # identical initial weights everywhere (and broadcast anyway)
        model = build_moco(cfg, comm, self.survey).to(device)
        check_cpu_channels_last(model, device, self.channels_last)
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

    def describe(self) -> str:
        cfg = self.cfg
        return (f"MoCo {cfg.model.arch}/{cfg.model.width}, batch {self.batch}/rank, queue {cfg.moco.queue_size} "
                f"({cfg.moco.queue_mode}), {self.precision.name}, {self.memory_format} on {self.device}")

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        # the stated memory format also for a loader's channels_last-strided views (the DALI GPU loader's)
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def begin(self, out_dir: Path) -> None:
        pass  # pretraining's files are the loop's (config, checkpoints, metrics) and the final export

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

    def train_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The loop's step: a loader batch's two views."""
        res = self.train_step(batch["view1"], batch["view2"])
        return {"loss": res["loss"], "metrics": {"acc": res["acc"]}, "lr": res["lr"], "momentum": res["momentum"]}

    def end_of_epoch(self, epoch: int) -> dict[str, float]:
        return {}  # pretraining has no per-epoch validation

    def finish(self, out_dir: Path, preempted: bool) -> dict[str, Any]:
        """Export the encoder (rank 0; not after a pre-emption, whose run continues)."""
        encoder_path = None
        if self.comm.rank == 0 and self.cfg.train.export_encoder and not preempted:
            encoder_path = export_moco_encoder(self.model, self.cfg.model, out_dir / "encoder.pt", self.step,
                                               self.cfg.augment)
        return {"precision": self.precision.name, "memory_format": self.memory_format,
                "encoder": str(encoder_path) if encoder_path else None}

    def summary(self, losses: list[float], start_step: int) -> dict[str, Any]:
        first, last, fill = _loss_window(losses, self.cfg.moco.queue_size, self.global_batch, start_step)
        return {"first_loss": first, "last_loss": last, "first_step_loss": losses[0] if losses else None,
                "queue_fill_steps": fill}

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_state(self, loader=None) -> dict[str, Any] | None:
        """Collective: gathers every rank's queue shard, RNG and loader state; the dict on rank 0 only."""
        comm, model = self.comm, self.model
        replicated = self.cfg.moco.queue_mode == "replicated"
        queue = model.queue.detach()
        shards = queue.unsqueeze(0) if (replicated or comm.world == 1) else comm.allgather(queue.unsqueeze(0))
        rngs = comm.allgather_object(rng_state(self.device))
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
            **self.records,
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
            set_rng_state(state["rng"][comm.rank], self.device)
            if loader is not None and state["loader"][comm.rank] is not None:
                loader.load_state_dict(state["loader"][comm.rank])
                return True
        else:
            log.warning("checkpoint was written by %d ranks x batch %d, now %d x %d: queue re-sharded, but the "
                        "data order and RNG streams restart (resume is not bit-exact)",
                        saved_world, saved_batch, comm.world, self.batch)
        return False


# ---------------------------------------------------------------------- the run


def _build_loader(cfg: Config, comm: Comm, dataset=None):
    from photoz_hpc.data import open_dataset

    try:
        from photoz_hpc.augment.loaders import build_loader
    except ImportError as exc:
        raise PhotozError(f"the data loaders (photoz_hpc.augment.loaders) are not available: {exc}") from None
    dataset = dataset if dataset is not None else open_dataset(cfg.data.path)
    return build_loader(cfg, dataset, pipeline="pretrain", rank=comm.rank, world_size=comm.world, seed=cfg.seed,
                        device=None, ranks_per_node=data_ranks_per_node(cfg, comm))


def run_pretrain(cfg: Config, loader=None, comm: Comm | None = None) -> dict[str, Any]:
    """Pretrain MoCo v2 per ``cfg`` on this rank; returns the run summary (same dict on every rank,
    file paths meaningful on rank 0). ``summary['preempted']`` is True after a SIGTERM/SIGUSR1 stop or a
    first Ctrl-C (then ``summary['interrupted']`` too).

    The SIGTERM/SIGUSR1 handler is installed first and restored last (``runtime.run_with_comm``): a
    signal during start-up (loader, checkpoint load) or after the loop (final save, export, summary)
    only sets the flag, so the run still ends with a checkpoint (or, with nothing trained yet, a clean
    pre-empted exit) instead of being killed."""
    from photoz_hpc.data import open_dataset
    from photoz_hpc.run_lock import RunDir
    from photoz_hpc.train.loop import run_loop
    from photoz_hpc.train.runtime import run_with_comm

    def body(cfg, comm, device, flag):
        nonlocal loader
        dataset = None
        if loader is None:
            dataset = open_dataset(cfg.data.path)
            survey = dataset.survey
        else:
            survey = loader_survey(loader, cfg)
        cfg = resolve_run_config(cfg, survey)  # saved (config.yaml, checkpoints, encoder.pt) with concrete crops
        if loader is None:
            loader = _build_loader(cfg, comm, dataset)
        trainer = Trainer(cfg, comm, device, len(loader), survey)
        return run_loop(cfg, trainer, loader, flag, device)

    return run_with_comm(cfg, comm, body, hold=RunDir(Path(cfg.out_dir), "pretrain"), interrupt=True)


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
