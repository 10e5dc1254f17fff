"""The DALI pipelines: one definition for CPU (``device_id=None``) and GPU.

Per view, ONE ``warp_affine`` (rotation + jitter + crop fused, 64x64 output, bilinear, zero fill)
followed by one fused arithmetic expression ``view * multiplier + noise * sigma`` (reddening or
dereddening and the noise scale are per-sample per-band arrays). Raw cutouts, matrices and
multipliers enter through a batch ``external_source`` reading zero-copy memory-mapped records; on
the GPU path the raw cutouts are staged in pinned (page-locked) buffers, move to the GPU first and
everything after runs there. DALI draws no
random numbers itself: all draws come from ``draws.py``, so the pipeline's state is the loader's
(seed, epoch, position) and resume is exact.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

import numpy as np
import torch

from photoz_hpc.augment.base import LoaderBase
from photoz_hpc.augment.source import BatchSource, SourceBatch


def _pinned_array(shape: tuple[int, ...]) -> np.ndarray:
    """A float32 numpy array in page-locked host memory (torch's pinned allocator; the array keeps it alive)."""
    return torch.empty(shape, dtype=torch.float32, pin_memory=True).numpy()


class _Feeder:
    """Callbacks of the external sources for one pass; batch k = start + DALI iteration."""

    def __init__(self, source: BatchSource, start: int, device: str) -> None:
        self.source, self.start, self.device = source, start, device
        self.parts = 1 + (source.spec.n_views if source.spec.noise else 0)
        self.pending: dict[int, list] = {}
        self.delivered: deque[tuple[SourceBatch, np.ndarray | None]] = deque()
        self._gpu_table: torch.Tensor | None = None
        # CPU: DALI's warp_affine with a fill value is ~5x slower than with clamped borders, so the
        # records are copied into zero-bordered buffers (1 pixel) and warped with clamping: a sample
        # outside the image then reads only zero pixels, i.e. exactly the zero fill (the matrices
        # shift by one pixel). Buffers return to the pool once their batch's outputs are out.
        # GPU: the records are copied into pinned staging buffers instead, so that DALI's host->device
        # copy runs at DMA speed rather than from pageable memory-mapped pages. A staging buffer is reused
        # only after the GPU has produced its batch's outputs (so its copy is complete): ``release`` gets
        # an event recorded after them.
        self.pad = device != "gpu"
        self.alloc = _pinned_array
        self._free: list[tuple[np.ndarray, object]] = []
        # device tensors handed to DALI per iteration (GPU noise fields): alive until their batch is out
        self._hold: dict[int, list[torch.Tensor]] = {}
        self._released = 0

    def release(self, buffer: np.ndarray | None, ready=None) -> None:
        """The oldest delivered batch is out: its buffer returns to the pool (reusable once ``ready``, a CUDA
        event, has completed) and the device tensors of its iteration are let go."""
        self._hold.pop(self._released, None)
        self._released += 1
        if buffer is not None:
            self._free.append((buffer, ready))

    def _buffer(self, shape: tuple[int, ...], alloc) -> np.ndarray:
        if not self._free:
            return alloc(shape)
        buf, ready = self._free.pop()
        if ready is not None:
            ready.synchronize()  # long complete by now (prefetch_queue_depth batches later): no stall
        return buf

    def _padded(self, images: list[np.ndarray]) -> np.ndarray:
        h, w, c = images[0].shape
        buf = self._buffer((len(images), h + 2, w + 2, c), lambda shape: np.zeros(shape, np.float32))
        for i, rec in enumerate(images):
            buf[i, 1:-1, 1:-1] = rec
        return buf

    def _staged(self, images: list[np.ndarray]) -> np.ndarray:
        h, w, c = images[0].shape
        buf = self._buffer((len(images), h, w, c), self.alloc)
        for i, rec in enumerate(images):
            buf[i] = rec
        return buf

    def _take(self, iteration: int) -> SourceBatch:
        k = self.start + iteration
        if k >= len(self.source):
            raise StopIteration
        entry = self.pending.get(iteration)
        if entry is None:
            entry = self.pending[iteration] = [self.source.batch(k), 0]
        entry[1] += 1
        if entry[1] == self.parts:
            del self.pending[iteration]
        return entry[0]

    def host(self, info) -> list:
        source_batch = self._take(info.iteration)
        buffer = self._padded(source_batch.images) if self.pad else self._staged(source_batch.images)
        self.delivered.append((source_batch, buffer))
        out: list = [buffer]
        for v in source_batch.views:
            matrix = v.matrix
            if self.pad:
                matrix = matrix.copy()
                matrix[:, :, 2] += 1.0
            out += [matrix, v.mult] + ([v.sigma] if v.sigma is not None else [])
        return out

    def noise(self, view: int):
        def fields(info):
            source_batch = self._take(info.iteration)
            if self.device != "gpu":
                return source_batch.views[view].noise
            out = self._gpu_fields(source_batch, view)
            self._hold.setdefault(info.iteration, []).append(out)
            return out

        return fields

    def _gpu_fields(self, source_batch: SourceBatch, view: int) -> torch.Tensor:
        """Noise fields built on the GPU (table gather). No synchronisation: DALI copies a torch tensor on
        torch's current stream, after the gather; inputs go up from pinned memory without blocking."""
        spec = self.source.spec
        if spec.noise_method == "table":
            if self._gpu_table is None or self._gpu_table_key != self.source.table.key:
                self._gpu_table = torch.from_numpy(self.source.table.table).cuda()  # once per epoch
                self._gpu_table_key = self.source.table.key
            offsets = _to_gpu(source_batch.views[view].draws.noise_offset)
            windows = self._gpu_table.unfold(0, spec.field_size, 1)[offsets]
            return windows.view(len(offsets), spec.crop, spec.crop, spec.bands)
        return _to_gpu(np.stack(source_batch.views[view].noise))


def _to_gpu(a: np.ndarray) -> torch.Tensor:
    """A host array on the current GPU via pinned memory, non-blocking (no host wait)."""
    return torch.from_numpy(a).pin_memory().cuda(non_blocking=True)


def build_pipeline(feeder: _Feeder, batch_size: int, num_threads: int, prefetch: int, device_id: int | None):
    """Build the DALI pipeline of ``feeder.source.spec`` on ``feeder.device``."""
    from nvidia.dali import fn, pipeline_def, types

    spec = feeder.source.spec
    gpu = feeder.device == "gpu"
    per_view = 3 if spec.noise else 2

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, prefetch_queue_depth=prefetch)
    def pipe():
        host = fn.external_source(
            source=feeder.host, num_outputs=1 + per_view * spec.n_views, batch=True, batch_info=True,
            layout=["HWC"] + [None] * (per_view * spec.n_views), dtype=types.FLOAT, no_copy=True,
        )
        images = host[0].gpu() if gpu else host[0]
        outs = []
        for v in range(spec.n_views):
            matrix, mult = host[1 + per_view * v], host[2 + per_view * v]
            fill = {} if feeder.pad else {"fill_value": 0.0}  # padded input: clamping == zero fill
            view = fn.warp_affine(images, matrix=matrix, size=[spec.crop, spec.crop], interp_type=types.INTERP_LINEAR, **fill)
            view = view * (mult.gpu() if gpu else mult)
            if spec.noise:
                sigma = host[3 + per_view * v]
                noise = fn.external_source(
                    source=feeder.noise(v), batch=True, batch_info=True, device=feeder.device, layout="HWC",
                    dtype=types.FLOAT, no_copy=not gpu,
                )
                view = view + noise * (sigma.gpu() if gpu else sigma)
            outs.append(view)
        return tuple(outs)

    p = pipe()
    p.build()
    return p


class DaliLoader(LoaderBase):
    """Runs the DALI pipeline for one epoch per iteration (rebuilt at each pass: cheap, and a fresh
    pipeline can never carry prefetched batches of another epoch or position)."""

    backend = "dali"

    def __init__(self, source: BatchSource, device: str, num_threads: int = 2, prefetch: int = 2) -> None:
        super().__init__(source, device)
        self.num_threads, self.prefetch = num_threads, prefetch

    def _iterate(self, start: int) -> Iterator[dict[str, torch.Tensor]]:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        n = len(self.source) - start
        if n <= 0:
            return
        spec = self.source.spec
        gpu = self.device == "gpu"
        feeder = _Feeder(self.source, start, self.device)
        device_id = self.torch_device.index if gpu else None
        pipe = build_pipeline(feeder, self.source.batch_size, self.num_threads, self.prefetch, device_id)
        shape = (self.source.batch_size, spec.crop, spec.crop, spec.bands)
        stream = torch.cuda.current_stream() if gpu else None
        try:
            for _ in range(n):
                outs = pipe.run()
                source_batch, buffer = feeder.delivered.popleft()
                views = []
                for tl in outs:
                    t = torch.empty(shape, dtype=torch.float32, device=self.torch_device)
                    feed_ndarray(tl.as_tensor(), t, cuda_stream=stream)
                    views.append(t.permute(0, 3, 1, 2))  # (B, C, S, S) view, channels_last strides
                feeder.release(buffer, stream.record_event() if gpu else None)
                yield self.make_batch(source_batch, views)
        finally:
            del pipe
