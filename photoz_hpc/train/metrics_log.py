"""Rank-0 metrics: a JSON-lines file (one object per logged step), TensorBoard scalars, and the progress log
lines of runs without a terminal (batch jobs)."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np

from photoz_hpc.logs import get_logger

log = get_logger(__name__)
_FILES = itertools.count()  # event files opened by this process (distinct names within one second)


class TensorBoardScalars:
    """Scalars in a TensorBoard event file, written by the calling thread, one event per logged step.

    TensorBoard's own ``SummaryWriter`` hands every event to a background thread whose Python (record CRCs
    included) then competes with the training thread for the GIL: in the CPU fine-tuning it added 0.3-0.5 ms
    of data wait to every step (benchmarks/RESULTS.md). Written here, the few records of a log step cost
    the training thread ~0.1 ms where it logs, and nothing elsewhere."""

    def __init__(self, directory: Path) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.summary.writer.record_writer import RecordWriter

        self._event, self._summary = Event, Summary
        directory.mkdir(parents=True, exist_ok=True)
        now = time.time()
        name = f"events.out.tfevents.{int(now):010d}.{socket.gethostname()}.{os.getpid()}.{next(_FILES)}"
        self._records = RecordWriter(open(directory / name, "wb"))
        try:
            self._write(Event(wall_time=now, file_version="brain.Event:2"))
        except OSError:
            self._records.close()
            raise

    def _write(self, event) -> None:
        self._records.write(event.SerializeToString())
        self._records.flush()  # readable by TensorBoard as soon as it is logged

    def add(self, step: int, values: dict[str, float]) -> None:
        summary = self._summary(value=[self._summary.Value(tag=k, simple_value=v) for k, v in values.items()])
        self._write(self._event(wall_time=time.time(), step=step, summary=summary))

    def close(self) -> None:
        self._records.close()


class MetricsLog:
    def __init__(self, out_dir: str | Path, enabled: bool = True, tensorboard: bool = True, prefix: str = "pretrain") -> None:
        self.enabled = enabled
        self.prefix = prefix
        self.path = Path(out_dir) / "metrics.jsonl"
        self._fh = None
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", buffering=1)
        if tensorboard:
            try:
                self._tb = TensorBoardScalars(Path(out_dir) / "tensorboard")
            except Exception as exc:  # tensorboard missing or broken: JSON lines still work
                log.warning("TensorBoard logging disabled: %s", exc)

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._fh.write(json.dumps({"step": step, **values}) + "\n")
        if self._tb is None:
            return
        scalars = {f"{self.prefix}/{key}": float(value) for key, value in values.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
        if scalars:
            try:
                self._tb.add(step, scalars)
            except OSError as exc:  # e.g. a full disk: the run and its JSON lines go on
                log.warning("TensorBoard logging stopped: %s", exc)
                tb, self._tb = self._tb, None
                with contextlib.suppress(OSError):
                    tb.close()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _duration(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class ProgressLines:
    """One log line every ``every`` steps and at the last step, for runs without tqdm's bar (stderr not a
    terminal, e.g. every Slurm job, or ``train.progress: false``), through the package logger:
    ``pretrain step 400/2400 (17%), epoch 3, loss 6.1234, 812 img/s, data wait 2%, ETA 0:04:05``.
    img/s and data wait are over the steps since the previous line; the ETA is the wall-clock time per step
    since the previous line (validation and checkpoints included) times the steps left."""

    def __init__(self, kind: str, start_step: int, total: int, every: int, global_batch: int) -> None:
        self.kind, self.total, self.every, self.global_batch = kind, total, every, global_batch
        self._reset(start_step)

    def _reset(self, step: int) -> None:
        self.last_step, self.last_time, self.n, self.step_s, self.data_s = step, time.monotonic(), 0, 0.0, 0.0

    def update(self, step: int, epoch: int, loss: float, step_s: float, data_s: float) -> None:
        self.n += 1
        self.step_s += step_s
        self.data_s += data_s
        if step % self.every and step != self.total:
            return
        wall = time.monotonic() - self.last_time
        per_step = wall / max(step - self.last_step, 1)
        img_s = self.global_batch * self.n / self.step_s if self.step_s > 0 else float("nan")
        wait = self.data_s / self.step_s if self.step_s > 0 else float("nan")
        log.info("%s step %d/%d (%.0f%%), epoch %d, loss %.4f, %.0f img/s, data wait %.0f%%, ETA %s", self.kind, step,
                 self.total, 100 * step / self.total, epoch, loss, img_s, 100 * wait,
                 _duration(per_step * (self.total - step)))
        self._reset(step)
