"""Device results read on the host one step late, without stalling the GPU.

A ``.tolist()`` of a CUDA tensor enqueues its device->host copy on the current stream, behind every kernel
launched so far: read "one step late" after step k+1 was launched, it still waits for step k+1. ``LateRead``
instead copies the values into pinned host memory with ``non_blocking=True`` right when they are produced and
records a CUDA event behind the copy; ``tolist()`` later waits for that event only (step k), not for the
stream. On a CPU the values are read as they are.
"""

from __future__ import annotations

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
