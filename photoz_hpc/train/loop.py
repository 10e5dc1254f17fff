"""The one training loop, shared by every task (MoCo pretraining, photo-z fine-tuning).

``run_loop(cfg, task, comm, loader, flag)`` owns what every run needs: resume (``train.resume``, only
of the same run: ``train/resume.py``), pre-emption (SIGTERM/SIGUSR1 -> checkpoint -> ``summary['preempted']``,
exit 75 in the CLI; a first Ctrl-C the same with ``summary['interrupted']``, exit 130), the no-progress watchdog,
the progress bar on a terminal or a log line every ``train.progress_every`` steps, ``metrics.jsonl`` +
TensorBoard, step timing, checkpoint
cadence and retention, end-of-epoch hooks (validation) and ``summary.json``. A task supplies the
model-specific parts (see ``Task``). Every rank runs the same sequence of collectives; rank 0 alone
writes files.

Host synchronisation: a step's metrics (loss, task metrics, the pre-emption flag) are reduced in
one all-reduce into a device tensor, copied at once into pinned host memory behind a CUDA event
(``train/late_reads.py``) and read on the host one step later, after that event: the host never waits
for the step it has just launched (loader time and kernel launches overlap the GPU's work); the check for a non-finite loss and the pre-emption agreement
therefore act one step late (the checkpoint written then is still a consistent state). The data wait
(``data_s``) is read with them: on a GPU it is the time between CUDA events recorded around the wait for
the batch, i.e. how long the GPU sat idle for it (``data_wait_clock`` in the summary), not where the host
happens to block.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from photoz_hpc.comm.base import Comm
from photoz_hpc.comm.liveness import Watchdog
from photoz_hpc.config import save_config
from photoz_hpc.errors import ConfigError, PhotozError
from photoz_hpc.io_utils import atomic_write_json
from photoz_hpc.logs import get_logger
from photoz_hpc.train.checkpoint import checkpoint_dir, find_latest_valid, load_checkpoint, save_checkpoint
from photoz_hpc.train.late_reads import DataWait, LateRead
from photoz_hpc.train.metrics_log import MetricsLog, ProgressLines
from photoz_hpc.train.resume import dataset_identities, global_batch_change, mismatch, records_mismatch
from photoz_hpc.train.signals import PreemptionFlag

log = get_logger(__name__)

#: Steps at the start of a run left out of the throughput figures (allocation, cudnn autotuning).
WARMUP_STEPS = 3


class Task(Protocol):
    """What a training task gives the loop."""

    kind: str  # checkpoint kind and metrics prefix: 'pretrain' | 'finetune'
    step: int
    total_steps: int
    steps_per_epoch: int
    global_batch: int
    comm: Comm
    records: dict[str, Any]  # what the model records about its data (survey, redshift grid): checked on resume

    def describe(self) -> str: ...  # one log line: model, precision, memory format, device

    def begin(self, out_dir: Path) -> None: ...  # rank 0: the task's files of a run about to train

    def train_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """One optimisation step; returns ``{'loss': device tensor, 'metrics': {name: device scalar}, ...floats}``."""
        ...

    def checkpoint_state(self, loader) -> dict[str, Any] | None: ...  # collective; the dict on rank 0

    def load_state(self, state: dict[str, Any], loader) -> bool: ...  # True if the loader position was restored

    def end_of_epoch(self, epoch: int) -> dict[str, float]: ...  # collective (validation); values to log

    def finish(self, out_dir: Path, preempted: bool) -> dict[str, Any]: ...  # exports; summary entries

    def summary(self, losses: list[float], start_step: int) -> dict[str, Any]: ...


def resume_state(cfg, comm: Comm, kind: str, records: dict[str, Any] | None = None
                 ) -> tuple[str | None, dict[str, Any] | None]:
    """The checkpoint this run continues from (``train.resume``: auto | never | path), on every rank; a
    checkpoint of another run (other data, lr, init...: ``train.resume.mismatch``; another survey or redshift grid
    than ``records``, the task's) is a ``ConfigError`` on every rank, listing the differences."""
    ckdir = checkpoint_dir(cfg.out_dir)
    if cfg.train.resume in ("never", "none"):
        return None, None
    path, state, problem, error = None, None, None, None
    if comm.rank == 0:
        try:
            if cfg.train.resume == "auto":
                found, state = find_latest_valid(ckdir, kind)
                path = str(found) if found else None
            else:
                path, state = cfg.train.resume, load_checkpoint(cfg.train.resume, kind)
            problem = _other_run(cfg, path, state, comm.world, records)
        except PhotozError as exc:  # every rank stops, not rank 0 alone
            error = exc
    path, problem, message = comm.broadcast_object((path, problem, str(error) if error else None))
    if error is not None:
        raise error
    if message:
        raise PhotozError(message)
    if problem:
        raise ConfigError(problem)
    if path and comm.rank != 0:
        state = load_checkpoint(path, kind)
    return path, state


def _other_run(cfg, path: str | None, state: dict[str, Any] | None, world: int,
               records: dict[str, Any] | None = None) -> str | None:
    """Why ``state`` is not a checkpoint of the run ``cfg`` describes on ``world`` ranks for a model recording
    ``records`` (None: it is, or there is none)."""
    if state is None:
        return None
    surveys = records_mismatch(state, records)
    if not isinstance(state.get("config"), dict):
        if surveys:
            return f"{path} was written for other data than this run's ({'; '.join(surveys)}): use a new out_dir"
        log.warning("%s carries no config: cannot check that it is the same run", path)
        return None
    diffs, unknown = mismatch(state["config"], state.get("datasets"), cfg, dataset_identities(cfg))
    diffs = surveys + diffs
    batch = global_batch_change(state, world, cfg.loader.batch_size)
    diffs += [batch] if batch else []
    if unknown:
        log.warning("%s predates config keys %s: not compared", path, ", ".join(unknown))
    if not diffs:
        return None
    return (f"{path} was written by another run than this config describes ({'; '.join(diffs)}): a resume continues "
            f"the same run, and only logging, checkpointing, the run's length and execution settings may change "
            f"(docs/training.md, 'Resuming'). Use a new out_dir for a new run, or restore those values to continue "
            f"this one")


def run_loop(cfg, task: Task, loader, flag: PreemptionFlag, device: torch.device,
             resumed: tuple[str | None, dict[str, Any] | None] | None = None) -> dict[str, Any]:
    """Train ``task`` on ``loader`` until ``total_steps`` or a stop signal; returns the run summary.
    ``resumed``: ``resume_state``'s answer when the caller needed it earlier (fine-tuning), else looked up here.

    Nothing is written before the run is known to train: a checkpoint of another run is refused (``resume_state``),
    and a finished run started again returns its ``summary.json`` (with ``already_finished``) and writes nothing."""
    from tqdm import tqdm

    comm = task.comm
    rank0, world = comm.rank == 0, comm.world
    out_dir = Path(cfg.out_dir)
    steps_per_epoch = task.steps_per_epoch
    if steps_per_epoch < 1:
        raise ConfigError(f"the dataset yields no full global batch of {world} x {cfg.loader.batch_size}")
    ckdir = checkpoint_dir(out_dir)

    path, state = resumed if resumed is not None else resume_state(cfg, comm, task.kind, getattr(task, "records", None))
    loader_restored = False
    if state is not None:
        loader_restored = task.load_state(state, loader)
    start_step, total = task.step, task.total_steps
    if state is not None and start_step < total:
        saved_loader = next((s for s in state.get("loader") or [] if s), None)
        if saved_loader is not None and hasattr(loader, "check_partition"):
            loader.check_partition(saved_loader)  # node partitions resume only on the same node layout
    if state is not None and start_step >= total:
        done = comm.broadcast_object(finished_summary(out_dir, start_step) if rank0 else None)
        if done is not None:
            log.info("%s run in %s is finished (step %d; this config asks for %d): nothing to do, nothing written. "
                     "Raise train.epochs or train.max_steps to continue it, or use a new out_dir", task.kind, out_dir,
                     start_step, total)
            return {**done, "already_finished": True}
        if start_step > total:
            raise ConfigError(f"{path} is at step {start_step}, beyond the {total} steps this config asks for: a run "
                              "cannot be shortened; raise train.epochs/train.max_steps or use a new out_dir")
    if state is not None:
        log.info("resumed from %s at step %d", path, start_step)
    if rank0:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir)
        task.begin(out_dir)
    datasets = dataset_identities(cfg) if rank0 else {}

    watchdog = None
    if cfg.dist.watchdog and world > 1:
        watchdog = Watchdog(cfg.dist.timeout_s, comm.rank)
        watchdog.start()
    metrics = MetricsLog(out_dir, enabled=rank0, tensorboard=cfg.train.tensorboard, prefix=task.kind)
    on_terminal = bool(getattr(sys.stderr, "isatty", lambda: False)())
    bar = tqdm(total=total, initial=start_step, disable=not (rank0 and cfg.train.progress and on_terminal),
               desc=task.kind, dynamic_ncols=True, leave=True)
    lines = None  # a log line every train.progress_every steps where there is no bar (batch jobs, progress=false)
    if rank0 and bar.disable and cfg.train.progress_every > 0:
        lines = ProgressLines(task.kind, start_step, total, cfg.train.progress_every, task.global_batch)
    log.info("%s: %s, %d rank%s (%s), %d steps (%d per epoch)", task.kind, task.describe(), world,
             "" if world == 1 else "s", comm.name, total, steps_per_epoch)

    losses: list[float] = []
    times = {"data_s": 0.0, "compute_s": 0.0, "comm_s": 0.0, "step_s": 0.0}
    epoch_first = {"data_s": 0.0, "n": 0}
    measured, last_ckpt, wait_clock = 0, None, None
    # a signal during start-up: agree on it before the first step (ranks may differ)
    seen = dict(zip(("preempt", "interrupt"), (v > 0 for v in comm.allreduce(_signal_flags(flag, device), "max")
                                                  .cpu().tolist()), strict=True))
    preempted = seen["preempt"] or seen["interrupt"]  # stopped by a signal, with a checkpoint to resume from
    if seen["interrupt"] and rank0:
        log.warning("interrupted (Ctrl-C) during start-up: stopping; press Ctrl-C again to stop at once")
    saved_step = start_step if state is not None else -1
    epoch = task.step // steps_per_epoch
    mid_epoch = loader_restored and task.step % steps_per_epoch != 0
    pending = None  # (step, LateRead of the reduced metrics, host values) of the previous step, read one step late

    def drain() -> bool:
        """Read the previous step's reduced metrics on the host; log them; True if a stop signal was raised."""
        nonlocal pending
        if pending is None:
            return False
        nonlocal measured
        step, reduced, host = pending
        pending = None
        values = [v / world for v in reduced.tolist()]  # the one host read of the step (waits for its copy alone)
        loss = values[0]
        if not np.isfinite(loss):
            raise PhotozError(f"loss became {loss} at step {step}; lower optim.lr or use fp32/bf16")
        losses.append(loss)
        named = dict(zip(host["names"], values[1:-2], strict=True))
        data_s, comm_s, step_s = host["wait"].seconds(), host["comm_s"], host["step_s"]  # the wait's events are done
        step_times = {"data_s": data_s, "comm_s": comm_s, "compute_s": step_s - data_s - comm_s, "step_s": step_s}
        if step - start_step > WARMUP_STEPS:
            measured += 1
            for k, v in step_times.items():
                times[k] += v
            if host["first_of_epoch"]:
                epoch_first["data_s"] += data_s
                epoch_first["n"] += 1
        scalars = {**host["floats"], "img_per_s": task.global_batch / step_s, "data_wait_frac": data_s / step_s,
                   **step_times}
        bar.set_postfix(ep=host["epoch"], loss=f"{loss:.3f}", img_s=f"{scalars['img_per_s']:.0f}",
                        wait=f"{100 * scalars['data_wait_frac']:.0f}%", refresh=False)
        if rank0 and (step % cfg.train.log_every == 0 or step == start_step + 1 or step == total):
            metrics.log(step, {"epoch": host["epoch"], "loss": loss, **named, **scalars})
        if lines is not None:
            lines.update(step, host["epoch"], loss, scalars["step_s"], scalars["data_s"])
        if values[-1] > 0 and not seen["interrupt"] and rank0:  # logged here, not in the signal handler (which
            log.warning("interrupted (Ctrl-C): stopping after a checkpoint; press Ctrl-C again to stop at once")
        seen["preempt"] |= values[-2] > 0  # could land mid-write on the stream a log line goes to)
        seen["interrupt"] |= values[-1] > 0
        return values[-2] > 0 or values[-1] > 0

    try:
        while task.step < total and not preempted:
            if not mid_epoch:
                loader.set_epoch(epoch)
            mid_epoch = False
            it = iter(loader)
            first_of_epoch = True
            while task.step < total:
                t0 = time.perf_counter()
                wait = DataWait(device)  # on a GPU: the time it sat idle for this batch (CUDA events)
                try:
                    batch = next(it)
                except StopIteration:
                    break
                wait_clock = wait.stop().clock
                c0 = comm.comm_seconds
                res = task.train_batch(batch)
                names = list(res.get("metrics", {}))
                local = torch.stack([res["loss"].detach().reshape(()).to(torch.float64),
                                     *(res["metrics"][n].detach().reshape(()).to(torch.float64) for n in names),
                                     *_signal_flags(flag, res["loss"].device)])
                reduced = LateRead(comm.allreduce(local, "sum"))  # one collective per step: metrics + pre-emption flag
                preempted = drain() or preempted  # the previous step's values: the device is busy with this one
                t2 = time.perf_counter()
                step = task.step
                if watchdog is not None:
                    watchdog.beat(step)
                host = {"epoch": epoch, "names": names, "floats": {k: v for k, v in res.items() if isinstance(v, float)},
                        "wait": wait, "comm_s": comm.comm_seconds - c0, "step_s": t2 - t0,
                        "first_of_epoch": first_of_epoch}
                first_of_epoch = False
                pending = (step, reduced, host)  # its timings too are read when its values are
                bar.update(1)
                if preempted:
                    break
                if step % steps_per_epoch == 0:  # the epoch's last step: validate before the checkpoint
                    epoch += 1
                    values = task.end_of_epoch(epoch - 1)
                    if values and rank0:
                        metrics.log(step, {"epoch": epoch - 1, **values})
                if step % cfg.train.checkpoint_every == 0 and step < total:
                    preempted = drain() or preempted  # a checkpoint only of a step whose loss was finite
                    if not preempted:
                        last_ckpt, saved_step = _save(task, loader, ckdir, cfg, datasets), step
        preempted = drain() or preempted
    except Exception as exc:
        hint = ""
        if world > 1 and isinstance(exc, RuntimeError) and not isinstance(exc, PhotozError):
            hint = (" -- if this is a communication error, another rank probably died or hung: its own log "
                    "lines (tagged [rank N]) or the launcher's exit report name it")
        log.error("rank %d failed at step %d: %s: %s%s", comm.rank, task.step + 1, type(exc).__name__, exc, hint)
        raise
    finally:
        bar.close()
        if watchdog is not None:
            watchdog.stop()

    if task.step != saved_step and not (preempted and task.step == 0):  # nothing trained: nothing to save
        last_ckpt = _save(task, loader, ckdir, cfg, datasets)
    elif last_ckpt is None and path:
        last_ckpt = Path(path)
    reads = read_report(comm, loader)  # a collective: every rank
    extras = task.finish(out_dir, preempted)
    metrics.close()
    n_measured = max(measured, 1)
    step_s = times["step_s"] / n_measured if measured else float("nan")
    summary = {
        "task": task.kind,
        "steps": task.step,
        "start_step": start_step,
        "total_steps": total,
        "preempted": preempted,
        "interrupted": preempted and seen["interrupt"] and not seen["preempt"],  # Ctrl-C alone: exit 130, not 75
        **task.summary(losses, start_step),
        "img_per_s": task.global_batch / step_s if measured else None,
        "step_time_s": {k: v / n_measured for k, v in times.items()} if measured else None,
        "data_wait_frac": times["data_s"] / times["step_s"] if measured else None,
        "data_wait_clock": wait_clock,
        "epoch_start_data_wait_s": epoch_first["data_s"] / epoch_first["n"] if epoch_first["n"] else None,
        "world_size": world,
        "reads": reads,
        "backend": comm.name,
        "device": str(device),
        "global_batch": task.global_batch,
        "checkpoint": str(last_ckpt) if last_ckpt else None,
        "metrics": str(metrics.path),
        "tensorboard": str(out_dir / "tensorboard") if cfg.train.tensorboard else None,
        **extras,
        "out_dir": str(out_dir),
    }
    if rank0:
        atomic_write_json(out_dir / "summary.json", summary)
        log.info("summary: %s", json.dumps(summary))
    return summary


def read_report(comm, loader) -> dict[str, Any] | None:
    """The training loader's reads on every rank (records, bytes, shard files touched: ``RecordReader.stats``) and,
    with node partitions, per node. Counted by this process: a resumed run reports what it read since the resume."""
    mine = loader.read_stats() if hasattr(loader, "read_stats") else None
    ranks = comm.allgather_object(None if mine is None else {"rank": comm.rank, **mine})
    if any(r is None for r in ranks):
        return None
    report: dict[str, Any] = {"partition": ranks[0]["partition"], "per_rank": ranks,
                              "bytes": sum(r["bytes"] for r in ranks), "records": sum(r["records"] for r in ranks)}
    if report["partition"] == "node":
        nodes: dict[int, dict[str, Any]] = {}
        for r in ranks:
            node = nodes.setdefault(r["node"], {"node": r["node"], "ranks": [], "records": 0, "bytes": 0, "roots": []})
            node["ranks"].append(r["rank"])
            node["records"] += r["records"]
            node["bytes"] += r["bytes"]
            if r["root"] not in node["roots"]:
                node["roots"].append(r["root"])
        report["per_node"] = [nodes[k] for k in sorted(nodes)]
    return report


def _signal_flags(flag: PreemptionFlag, device) -> torch.Tensor:
    """[a pre-emption signal arrived, SIGINT arrived] on this rank, as a device tensor for the step's reduction
    (filled on the device: ``torch.tensor(list)`` would be a host->device copy every step)."""
    return torch.stack([torch.full((), float(v), dtype=torch.float64, device=device)
                        for v in (flag.preempted, flag.interrupted)])


def finished_summary(out_dir: Path, step: int) -> dict[str, Any] | None:
    """The ``summary.json`` of a run that finished at ``step`` (not pre-empted), else None."""
    try:
        summary = json.loads((out_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if isinstance(summary, dict) and summary.get("preempted") is False and summary.get("steps") == step:
        return summary
    return None


def _save(task: Task, loader, ckdir: Path, cfg, datasets: dict[str, str | None]) -> Path | None:
    state = task.checkpoint_state(loader)
    path = None
    if state is not None:  # the datasets' identities: a resume checks it trains on the same data
        path = save_checkpoint(ckdir, task.step, {"task": task.kind, "datasets": datasets, **state},
                               keep=cfg.train.keep_checkpoints)
        log.info("checkpoint %s", path)
    path = task.comm.broadcast_object(str(path) if path else None)
    return Path(path) if path else None
