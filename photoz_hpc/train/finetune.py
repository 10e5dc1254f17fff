"""Photo-z fine-tuning as a task on the shared loop: ``run_finetune(cfg) -> summary``.

One network and one loop for the three methods of the paper's comparison: ``finetune.init`` a
pretraining checkpoint or an exported ``encoder.pt`` (self-supervised), ``none`` (the supervised
baseline), and ``finetune.freeze_backbone`` (linear probe: trunk frozen, BatchNorm statistics too).
Training: cross-entropy over the model's redshift bins (``finetune.z_min`` / ``z_max`` / ``n_z_bins``, by default
the survey's: SDSS 180 bins over [0, 0.4)) on dereddened, rotated and jitter-cropped labeled images (the
``finetune`` pipeline), the trunk at ``backbone_lr_scale`` x the head's lr. The stem reads the training data's
bands; a ``finetune.init`` encoder of other bands, or validation data of other bands, is refused before any
loader is built or file written. Checkpoints and the exported models record the survey and the grid. Validation on
the ``eval`` pipeline every ``val_every`` epochs; the best network by validation sigma_MAD, among
validations whose outlier rate is at most ``finetune.select_max_eta`` (``selection_key``), is kept as
``best_model.pt`` (bin accuracy rewards the mode, sigma_MAD what we report).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from photoz_hpc.comm.base import Comm
from photoz_hpc.config import FinetuneRunConfig
from photoz_hpc.data.dataset import ShardedDataset, open_dataset
from photoz_hpc.data.splits import check_disjoint, holdout_split, labeled_ids, load_ids, nested_subset, save_ids
from photoz_hpc.errors import ConfigError, PhotozError
from photoz_hpc.io_utils import atomic_write_json
from photoz_hpc.logs import get_logger
from photoz_hpc.metrics import grid_z_bins, photoz_metrics
from photoz_hpc.models.cpu_guards import check_cpu_channels_last
from photoz_hpc.models.photoz_net import build_photoz_net, save_photoz_model
from photoz_hpc.models.records import check_bands, grid_record, survey_record
from photoz_hpc.survey import RedshiftGrid, Survey
from photoz_hpc.train.checkpoint import WrongCheckpointKind, checkpoint_dir, list_checkpoints, read_pretrained_encoder
from photoz_hpc.train.inference import predict
from photoz_hpc.train.optim import build_optimizer, lr_at, set_lr
from photoz_hpc.train.precision import backward_and_step, resolve_precision
from photoz_hpc.train.runtime import data_ranks_per_node, rng_state, set_rng_state
from photoz_hpc.train.surveys import data_survey, finetune_grid, resolve_run_config

log = get_logger(__name__)

BEST_MODEL, FINAL_MODEL = "best_model.pt", "photoz_model.pt"
TRAIN_IDS, VAL_IDS = "train_ids.npy", "val_ids.npy"
_ARCH_KEYS = ("arch", "width", "stem_kernel")


# ---------------------------------------------------------------------- initialisation


def encoder_init_state(init: str, model_cfg, survey: Survey | None = None,
                       data: str = "the training data") -> dict[str, torch.Tensor] | None:
    """The trunk weights ``finetune.init`` names: None for 'none', else from a pretraining checkpoint
    (its query encoder) or an ``encoder.pt``; the architecture must match ``model`` and, when ``survey`` (that of
    ``data``, the training data) is given, the bands it was pretrained on must be the data's."""
    if init.lower() == "none":
        return None
    path = Path(init)
    if not path.is_file():
        raise ConfigError(f"finetune.init '{init}' is not a file (a pretraining checkpoint, an encoder.pt, or 'none')")
    try:
        source = read_pretrained_encoder(path, "finetune.init")
    except WrongCheckpointKind as exc:
        raise PhotozError(f"{exc}: to continue that run use train.resume=PATH (or its out_dir)") from None
    if survey is not None:
        check_bands(source["survey"], f"finetune.init {path}", survey, data)
    arch, state = source["config"]["model"], source["trunk"]
    want = {k: getattr(model_cfg, k) for k in _ARCH_KEYS}
    have = {k: arch.get(k) for k in _ARCH_KEYS}
    if want != have:
        overrides = " ".join(f"model.{k}={v}" for k, v in have.items())
        raise ConfigError(f"finetune.init {path} holds a {have} encoder but the config asks for {want}: set {overrides}")
    return state


@dataclasses.dataclass(frozen=True)
class EncoderInit:
    """The trunk weights ``finetune.init`` names, read and checked (``state`` None: random, the baseline)."""

    state: dict[str, torch.Tensor] | None


# ---------------------------------------------------------------------- data


@dataclasses.dataclass
class FinetuneData:
    """The training subset and the validation set (datasets and ids), fixed for the whole run."""

    train: ShardedDataset
    train_ids: np.ndarray
    val: ShardedDataset
    val_ids: np.ndarray
    n_labeled: int


def select_data(cfg: FinetuneRunConfig, out_dir: Path | None = None) -> FinetuneData:
    """Split and subset per ``finetune``; checked against ``out_dir``'s ``train_ids.npy``/``val_ids.npy`` once that
    run has a checkpoint (the selection it trained on). Files of a run that never checkpointed bind nothing: they
    are replaced when this run starts training (``FinetuneTask.begin``), so a failed start never pins a selection.
    Validation data (``finetune.val_data``) of other bands than the training data is an error naming both."""
    ft = cfg.finetune
    train = open_dataset(cfg.data.path)
    pool = labeled_ids(train)
    if ft.val_data:
        val = open_dataset(ft.val_data)
        check_bands(train.survey, f"data.path {train.root}", val.survey,
                    f"finetune.val_data {val.root}")
        val_ids = labeled_ids(val)
    else:
        val = train
        pool, val_ids = holdout_split(pool, ft.val_fraction, ft.split_seed)
    train_ids = nested_subset(pool, ft.label_fraction, ft.subset_seed)
    check_disjoint(train, train_ids, val, val_ids)
    if out_dir is not None and list_checkpoints(checkpoint_dir(out_dir)):
        for name, ids in ((TRAIN_IDS, train_ids), (VAL_IDS, val_ids)):
            path = out_dir / name
            if path.exists() and not np.array_equal(load_ids(path), ids):
                raise ConfigError(f"{path} lists other galaxies than this config selects (data, finetune.label_fraction, "
                                  "subset_seed, val_* changed?): use a new out_dir")
    return FinetuneData(train, train_ids, val, val_ids, len(pool))


# ---------------------------------------------------------------------- ranks agree on BatchNorm statistics


@torch.no_grad()
def average_buffers(module: torch.nn.Module, comm: Comm) -> None:
    """Average ``module``'s floating-point buffers over ranks in one all-reduce per (device, dtype): the buffers
    flattened into one tensor. One all-reduce per buffer was ~200 collectives for a ResNet-50 (each synchronous
    under Horovod); the mean of each element is the same."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for buf in module.buffers():
        if buf.is_floating_point() and buf.numel():
            groups.setdefault((buf.device, buf.dtype), []).append(buf)
    for bufs in groups.values():
        flat = comm.allreduce(_flatten_dense_tensors(bufs), "mean")
        for buf, mean in zip(bufs, _unflatten_dense_tensors(flat, bufs), strict=True):
            buf.copy_(mean)


# ---------------------------------------------------------------------- which network is kept


def selection_key(metrics: dict[str, Any], max_eta: float) -> tuple[int, float, float]:
    """Sort key of a validation for the best network (lowest first): the lowest sigma_MAD among validations with
    an outlier rate eta <= ``max_eta``; if none qualifies, the lowest eta (then sigma_MAD). More than half the
    galaxies outlying (eta > 0.5, the default) is beyond the MAD's 50% breakdown point: sigma_MAD then measures a
    minority and can be small for a network that is wrong for most galaxies (a short run kept an epoch with eta
    72% over one with 30%). ``max_eta`` 1.0: sigma_MAD alone."""
    if metrics["eta"] <= max_eta:
        return (0, metrics["sigma_mad"], metrics["eta"])
    return (1, metrics["eta"], metrics["sigma_mad"])


# ---------------------------------------------------------------------- the task


class FinetuneTask:
    """PhotoZNet + optimiser + one cross-entropy step + validation, wired to a communicator."""

    kind = "finetune"

    def __init__(self, cfg: FinetuneRunConfig, comm: Comm, device: torch.device, steps_per_epoch: int,
                 data: FinetuneData, val_loader, channels_last: bool = False, survey: Survey | None = None,
                 init: EncoderInit | None = None) -> None:
        """``survey``: the training data's (None: read from ``data.train``); ``init``: ``finetune.init`` already
        read and checked (None: read here)."""
        self.comm, self.device, self.data, self.val_loader = comm, device, data, val_loader
        self.survey = survey or data.train.survey
        cfg = self.cfg = resolve_run_config(cfg, self.survey)  # the grid and crops as numbers (idempotent)
        self.grid = finetune_grid(cfg.finetune, self.survey)
        self.records = {**survey_record(self.survey), **grid_record(self.grid)}  # checked on resume
        ft = cfg.finetune
        self.batch = cfg.loader.batch_size
        self.global_batch = self.batch * comm.world
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
        self.channels_last = channels_last
        torch.manual_seed(cfg.seed)  # identical head init everywhere (and broadcast anyway)
        net = build_photoz_net(cfg.model, self.survey, self.grid)
        if init is None:
            init = EncoderInit(encoder_init_state(ft.init, cfg.model, self.survey, f"data.path {cfg.data.path}"))
        if init.state is not None:
            missing, unexpected = net.encoder.load_state_dict(init.state, strict=False)
            if missing or unexpected:
                raise PhotozError(f"finetune.init {ft.init} does not fit the encoder (missing {missing[:4]}, "
                                  f"unexpected {unexpected[:4]})")
        if ft.freeze_backbone:
            for p in net.encoder.parameters():
                p.requires_grad_(False)
        net = net.to(device)
        check_cpu_channels_last(net, device, channels_last)
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        self.model = net
        self.precision = resolve_precision(cfg.train.precision, device)
        groups = [{"params": list(net.encoder.parameters()), "lr_scale": ft.backbone_lr_scale, "name": "backbone"},
                  {"params": list(net.head.parameters()), "lr_scale": 1.0, "name": "head"}]
        optimizer = build_optimizer(groups, cfg.optim)
        comm.broadcast_state(net, optimizer, [])
        self.net = comm.wrap_model(net, device, [])
        self.optimizer = comm.wrap_optimizer(optimizer, net)
        self.params = [p for p in net.parameters() if p.requires_grad]
        self.step = 0
        self.best: dict[str, Any] = {"sigma_mad": math.inf, "epoch": None, "step": None, "metrics": None}
        self.last_val: dict[str, Any] | None = None
        self._set_train_mode()

    def describe(self) -> str:
        ft = self.cfg.finetune
        method = "linear probe" if ft.freeze_backbone else ("supervised baseline" if ft.init.lower() == "none" else "fine-tune")
        grid = self.grid
        return (f"{method} of {self.cfg.model.arch}/{self.cfg.model.width} ({self.survey.name} bands "
                f"{''.join(self.survey.bands)}, {grid.n_bins} redshift bins over [{grid.z_min:g}, {grid.z_max:g})) "
                f"on {len(self.data.train_ids)} labeled "
                f"galaxies ({ft.label_fraction:g} of {self.data.n_labeled}), validation {len(self.data.val_ids)}, batch "
                f"{self.batch}/rank, {self.precision.name}, "
                f"{'channels_last' if self.channels_last else 'contiguous'} on {self.device}")

    def begin(self, out_dir: Path) -> None:
        """The selection this run trains on (rank 0, once the run is sure to train): ids and ``labels.json``."""
        cfg, data = self.cfg, self.data
        for name, ids in ((TRAIN_IDS, data.train_ids), (VAL_IDS, data.val_ids)):
            if not (out_dir / name).exists() or not np.array_equal(load_ids(out_dir / name), ids):
                save_ids(out_dir / name, ids)  # absent, or left by a run that never checkpointed (select_data)
        atomic_write_json(out_dir / "labels.json", {
            "train_data": str(data.train.root), "val_data": str(data.val.root), "n_labeled": data.n_labeled,
            "label_fraction": cfg.finetune.label_fraction, "subset_seed": cfg.finetune.subset_seed,
            "n_train": int(len(data.train_ids)), "n_val": int(len(data.val_ids)),
            "split": "separate dataset" if cfg.finetune.val_data else
                     f"held out {cfg.finetune.val_fraction:g} (split_seed {cfg.finetune.split_seed})"})

    def _set_train_mode(self) -> None:
        self.model.train()
        if self.cfg.finetune.freeze_backbone:
            self.model.encoder.eval()  # a probe keeps the pretrained BatchNorm statistics

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)  # the stated format also for a loader's channels_last views
        return x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def train_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        cfg = self.cfg
        lr = lr_at(self.step, self.total_steps, self.steps_per_epoch, self.global_batch, cfg.optim)
        set_lr(self.optimizer, lr)
        self.optimizer.zero_grad()
        target = batch["z_bin"].to(self.device, non_blocking=True)
        with self.precision.autocast():
            logits = self.net(self._prep(batch["image"]))
        loss = F.cross_entropy(logits.float(), target)
        backward_and_step(loss, self.optimizer, self.precision, self.params, cfg.optim.grad_clip,
                          horovod=self.comm.name == "horovod")
        self.step += 1
        acc = (logits.detach().argmax(1) == target).float().mean()
        return {"loss": loss.detach(), "metrics": {"bin_acc": acc}, "lr": lr}

    # ------------------------------------------------------------------ validation
    def sync_buffers(self) -> None:
        """Average BatchNorm running statistics over ranks (each rank saw other galaxies), so that every
        rank validates, checkpoints and exports the same network."""
        if self.comm.world < 2:
            return
        average_buffers(self.model, self.comm)

    def validate(self) -> dict[str, Any]:
        """Validation metrics of the current network (collective; same dict on every rank)."""
        self.sync_buffers()
        pred = predict(self.model, self.val_loader, self.comm, self.device, self.precision.autocast,
                       channels_last=self.channels_last)
        z_spec = self.data.val.meta["specz_redshift"][pred["index"]]
        m = photoz_metrics(pred["z_phot"], z_spec, z_bins=grid_z_bins(self.grid))
        self._set_train_mode()
        return m

    def end_of_epoch(self, epoch: int) -> dict[str, float]:
        ft = self.cfg.finetune
        last = self.step >= self.total_steps
        if (epoch + 1) % ft.val_every != 0 and not last:
            return {}
        m = self.validate()
        self.last_val = {"epoch": epoch, "step": self.step, **{k: m[k] for k in ("sigma_mad", "eta", "bias", "n")}}
        best_m = self.best.get("metrics")
        improved = best_m is None or selection_key(m, ft.select_max_eta) < selection_key(best_m, ft.select_max_eta)
        if m["eta"] > ft.select_max_eta:
            log.info("epoch %d validation: eta %.1f%% > finetune.select_max_eta %.0f%%: ranked by eta, below every "
                     "validation within it", epoch, 100 * m["eta"], 100 * ft.select_max_eta)
        if improved:
            self.best = {"sigma_mad": m["sigma_mad"], "epoch": epoch, "step": self.step, "metrics": m}
            if self.comm.rank == 0:
                self._export(Path(self.cfg.out_dir) / BEST_MODEL, {"epoch": epoch, "step": self.step,
                                                                   "val_metrics": m})
        log.info("epoch %d validation: sigma_MAD %.5f, eta %.3f%%, bias %+.5f (best: sigma_MAD %.5f, eta %.3f%% at "
                 "epoch %s)", epoch, m["sigma_mad"], 100 * m["eta"], m["bias"], self.best["sigma_mad"],
                 100 * self.best["metrics"]["eta"], self.best["epoch"])
        return {"val_sigma_mad": m["sigma_mad"], "val_eta": m["eta"], "val_bias": m["bias"],
                "val_outlier_rate_lsst": m["outlier_rate_lsst"]}

    def _export(self, path: Path, extra: dict[str, Any]) -> Path:
        ft = self.cfg.finetune
        return save_photoz_model(self.model, self.cfg.model, path, {
            "method": "linear_probe" if ft.freeze_backbone else ("supervised" if ft.init.lower() == "none" else "ssl"),
            "init": ft.init, "label_fraction": ft.label_fraction, "config": dataclasses.asdict(self.cfg), **extra})

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_state(self, loader=None) -> dict[str, Any] | None:
        self.sync_buffers()
        rngs = self.comm.allgather_object(rng_state(self.device))
        loaders = self.comm.allgather_object(loader.state_dict() if loader is not None else None)
        if self.comm.rank != 0:
            return None
        return {
            "model": {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()},
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "scaler": self.precision.scaler.state_dict() if self.precision.scaler is not None else None,
            "world": self.comm.world, "batch_size": self.batch,
            "schedule": {"total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch},
            "best": self.best, "last_val": self.last_val,
            "rng": rngs, "loader": loaders, "config": dataclasses.asdict(self.cfg), **self.records,
        }

    def load_state(self, state: dict[str, Any], loader=None) -> bool:
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise PhotozError(f"fine-tuning checkpoint does not match the model ({exc}); was it written with "
                              "another model.arch/width/stem_kernel?") from None
        self.optimizer.load_state_dict(state["optimizer"])
        if self.precision.scaler is not None and state.get("scaler"):
            self.precision.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.best, self.last_val = state["best"], state.get("last_val")
        if state["world"] == self.comm.world and state["batch_size"] == self.batch:
            set_rng_state(state["rng"][self.comm.rank], self.device)
            if loader is not None and state["loader"][self.comm.rank] is not None:
                loader.load_state_dict(state["loader"][self.comm.rank])
                return True
        else:
            log.warning("checkpoint was written by %d ranks x batch %d, now %d x %d: the data order restarts "
                        "(resume is not bit-exact)", state["world"], state["batch_size"], self.comm.world, self.batch)
        return False

    # ------------------------------------------------------------------ the end
    def finish(self, out_dir: Path, preempted: bool) -> dict[str, Any]:
        final = best = None
        if not preempted:
            self.sync_buffers()
            if self.best["epoch"] is None:  # never validated (e.g. max_steps inside the first epoch)
                self.end_of_epoch(self.step // self.steps_per_epoch)
            if self.comm.rank == 0:
                final = self._export(out_dir / FINAL_MODEL, {"step": self.step, "val_metrics": self.last_val})
                best = out_dir / BEST_MODEL
        return {"model": str(final) if final else None, "best_model": str(best) if best else None,
                "best_val": {k: v for k, v in self.best.items() if k != "metrics"}
                | {"eta": (self.best["metrics"] or {}).get("eta")},
                "last_val": self.last_val, "precision": self.precision.name,
                "memory_format": "channels_last" if self.channels_last else "contiguous",
                "n_train": int(len(self.data.train_ids)), "n_val": int(len(self.data.val_ids))}

    def summary(self, losses: list[float], start_step: int) -> dict[str, Any]:
        w = max(1, min(10, len(losses) // 5))
        return {"first_loss": float(np.mean(losses[:w])) if losses else None,
                "last_loss": float(np.mean(losses[-w:])) if losses else None}


# ---------------------------------------------------------------------- the run


def run_finetune(cfg: FinetuneRunConfig, comm: Comm | None = None, loader=None) -> dict[str, Any]:
    """Fine-tune per ``cfg`` on this rank; returns the run summary (``summary['preempted']`` after a
    SIGTERM/SIGUSR1 stop, with a checkpoint to resume from). ``loader``: the training loader to use
    instead of the one ``cfg`` describes (tests wrap it)."""
    from photoz_hpc.run_lock import RunDir
    from photoz_hpc.train.runtime import run_with_comm

    return run_with_comm(cfg, comm, lambda cfg, comm, device, flag: run_finetune_on(cfg, comm, device, flag, loader),
                         hold=RunDir(Path(cfg.out_dir), "finetune"), interrupt=True)


def finetune_loaders(cfg: FinetuneRunConfig, comm: Comm, data: FinetuneData, grid: RedshiftGrid | None = None):
    """(training loader over the label subset, validation loader over the validation set) of this rank; the
    ``z_bin`` labels on ``grid``, the model's (None: ``finetune.z_*`` resolved for the training data's survey)."""
    from photoz_hpc.augment.loaders import build_loader

    grid = grid or finetune_grid(cfg.finetune, data.train.survey)
    loader = build_loader(cfg, data.train, "finetune", comm.rank, comm.world, cfg.seed, ids=data.train_ids, grid=grid,
                          ranks_per_node=data_ranks_per_node(cfg, comm))
    if len(loader) < 1:
        raise ConfigError(no_batch_advice(len(data.train_ids), comm.world, cfg))
    val_loader = build_loader(cfg, data.val, "eval", comm.rank, comm.world, cfg.seed, ids=data.val_ids,
                              batch_size=cfg.finetune.eval_batch_size or cfg.loader.batch_size, grid=grid)
    return loader, val_loader


def no_batch_advice(n_train: int, world: int, cfg: FinetuneRunConfig) -> str:
    """Why ``n_train`` galaxies give no training step, and only advice that can be followed."""
    ways = []
    if n_train >= world:
        ways.append(f"set loader.batch_size <= {n_train // world}")
    else:
        ways.append(f"run on at most {n_train} ranks with loader.batch_size=1")
    if cfg.finetune.label_fraction < 1:
        ways.append(f"raise finetune.label_fraction (now {cfg.finetune.label_fraction:g})")
    if not cfg.finetune.val_data:
        ways.append(f"lower finetune.val_fraction (now {cfg.finetune.val_fraction:g})")
    ways.append(f"add labeled galaxies to {cfg.data.path}")
    return (f"{n_train} training galaxies give no full global batch of {world} x {cfg.loader.batch_size}: "
            + ", or ".join(ways))


def run_finetune_on(cfg: FinetuneRunConfig, comm: Comm, device: torch.device, flag, loader=None) -> dict[str, Any]:
    """The fine-tuning run on an existing communicator and device (``run_finetune`` sets those up). Before any
    loader is built or file written: the survey of the training data (the stem's bands), the config resolved for it
    (crops, redshift grid), a checkpoint of another run refused, ``finetune.init`` of other bands refused."""
    from photoz_hpc.train.loop import resume_state, run_loop
    from photoz_hpc.train.runtime import use_channels_last

    survey = data_survey(cfg.data.path)
    cfg = resolve_run_config(cfg, survey)
    grid = finetune_grid(cfg.finetune, survey)
    records = {**survey_record(survey), **grid_record(grid)}
    resumed = resume_state(cfg, comm, "finetune", records)  # another run's checkpoint: refused before anything else
    init = EncoderInit(encoder_init_state(cfg.finetune.init, cfg.model, survey, f"data.path {cfg.data.path}"))
    data = select_data(cfg, Path(cfg.out_dir))
    own_loader, val_loader = finetune_loaders(cfg, comm, data, grid)
    loader = loader or own_loader
    task = FinetuneTask(cfg, comm, device, len(loader), data, val_loader, use_channels_last(cfg, device),
                        survey=survey, init=init)
    return run_loop(cfg, task, loader, flag, device, resumed=resumed)  # files written once it trains (begin)
