"""Device results read on the host one step late, without stalling the GPU.

A ``.tolist()`` of a CUDA tensor enqueues its device->host copy on the current stream, behind every kernel
launched so far: read "one step late" after step k+1 was launched, it still waits for step k+1. ``LateRead``
instead copies the values into pinned host memory with ``non_blocking=True`` right when they are produced and
records a CUDA event behind the copy; ``tolist()`` later waits for that event only (step k), not for the
stream. On a CPU the values are read as they are.

``DataWait`` times the wait for a batch the same way: on a GPU with an event pair read one step late, since once
nothing blocks the host, its clock around ``next(loader)`` no longer says how long the GPU waited.
"""

from __future__ import annotations

import time

import torch


def _on_gpu(device: torch.device) -> bool:
    """Whether ``device``'s results need the pinned copy and an event (the one place tests fake a GPU)."""
    return device.type == "cuda"


class LateRead:
    """``values`` (a device tensor just computed), to be read on the host later with ``tolist()``."""

    def __init__(self, values: torch.Tensor) -> None:
        self._event = None
        if not _on_gpu(values.device):
            self._host = values
            return
        self._host = torch.empty(values.shape, dtype=values.dtype).pin_memory()
        self._host.copy_(values, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()  # on the current stream, right behind the copy

    def tolist(self) -> list:
        """The values; on a GPU waits for their copy alone (the work launched since keeps running)."""
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()


class DataWait:
    """The wait for one batch, as the device sees it: ``DataWait(device)`` before asking the loader, ``stop()`` when
    the batch is there, ``seconds()`` later. CPU: the host clock. GPU: the time between two events recorded around
    the wait, i.e. how long the GPU sat idle for the batch (zero when the steps already queued kept it busy while the
    host waited; plus any augmentation a loader runs on the stream). ``seconds()`` needs both events completed:
    call it after a later event's ``synchronize`` (the step's ``LateRead``), never right away."""

    def __init__(self, device: torch.device) -> None:
        self._t0 = time.perf_counter()
        self.host_s = 0.0
        self._start = self._end = None
        if _on_gpu(device):
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()

    @property
    def clock(self) -> str:
        """What ``seconds()`` measures with (a summary's ``data_wait_clock``)."""
        return "host clock" if self._start is None else "cuda events"

    def stop(self) -> DataWait:
        self.host_s = time.perf_counter() - self._t0
        if self._start is not None:
            self._end = torch.cuda.Event(enable_timing=True)
            self._end.record()
        return self

    def seconds(self) -> float:
        if self._start is None:
            return self.host_s
        return self._start.elapsed_time(self._end) / 1e3
