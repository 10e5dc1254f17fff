"""The DALI pipelines: one definition for CPU (``device_id=None``) and GPU.

Per view, ONE ``warp_affine`` (rotation + jitter + crop fused, S x S output, bilinear, zero fill)
followed by one fused arithmetic expression ``view * multiplier + noise * sigma`` (reddening or
dereddening and the noise scale are per-sample per-band arrays). Raw cutouts, matrices and
multipliers enter through a batch ``external_source`` reading zero-copy memory-mapped records; on
the GPU path the raw cutouts are staged in pinned (page-locked) buffers, move to the GPU first and
everything after runs there. DALI draws no
random numbers itself: all draws come from ``draws.py``, so the pipeline's state is the loader's
(seed, epoch, position) and resume is exact.

One pipeline serves the whole run: the feeder numbers DALI's iterations with positions (epoch, batch)
and, at the end of an epoch, goes on with the first batch of the next one (``next_epoch``), so the
prefetch queue is full when the next epoch starts. A pass that starts anywhere else (a resume, a
skipped epoch, a pass abandoned midway) gets a fresh pipeline: a prefetched batch of another position
can never be delivered. The next epoch's plan and noise table are prepared in a background thread.

The host work of a batch (its draws, ``BatchSource.batch``, and the copy of its records into a pinned staging
or zero-bordered buffer: ~58 MB per batch of 256 on the GPU path) runs in a small thread pool, ``ahead``
batches before DALI asks for them (NumPy copies release the GIL), not in the training thread, which DALI's
callbacks run in. Positions are still assigned in order in the calling thread, and each prepared batch is
keyed by its DALI iteration, so the batches and their order are those of the synchronous path (``ahead=0``).

Records keep the store's dtype up to the read: from a float16 store (``prepare --dtype float16``) the GPU path
stages float16 records, copies half the bytes to the device and casts them to float32 there (``fn.cast`` before
the warp); the CPU path hands DALI the float16 records (or float16 bordered copies) and casts in DALI too (NumPy's
float16 -> float32 conversion is ~5x slower than a copy). Float32 stores take the path they always took (no cast).
"""

from __future__ import annotations

import copy
import functools
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from photoz_hpc.augment import draws
from photoz_hpc.augment.base import LoaderBase
from photoz_hpc.augment.source import BatchSource, SourceBatch

_TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16}


def _pinned_array(shape: tuple[int, ...], dtype: np.dtype | type = np.float32) -> np.ndarray:
    """A numpy array of ``dtype`` (float32 or float16) in page-locked host memory (torch's pinned allocator; the
    array keeps it alive)."""
    return torch.empty(shape, dtype=_TORCH_DTYPES[np.dtype(dtype)], pin_memory=True).numpy()


class EpochSources:
    """The loader's ``BatchSource`` at each epoch (shallow copies: plan and noise table per epoch, records
    shared). Asking for epoch e starts preparing ``next_epoch(e)`` in a background thread (NumPy draws the
    table without the GIL), so an epoch boundary never waits for the next epoch's ~60 ms table."""

    KEEP = 3  # epochs held: the feeder's, the next one being prepared, the consumer's

    def __init__(self, template: BatchSource, next_epoch: Callable[[int], int]) -> None:
        self.template, self.next_epoch = template, next_epoch
        self._ready: dict[int, Future | BatchSource] = {template.epoch: template}
        self._pool: ThreadPoolExecutor | None = None
        self.prepare_next = True

    def clear(self) -> None:
        """Forget every prepared epoch (the next ``get`` prepares its epoch inline)."""
        self._ready = {}

    def _make(self, epoch: int) -> BatchSource:
        source = copy.copy(self.template)
        source.set_epoch(epoch)  # rebinds plan and table on the copy only
        return source

    def get(self, epoch: int) -> BatchSource:
        entry = self._ready.pop(epoch, None)
        if entry is None:
            entry = self._make(epoch)
        elif isinstance(entry, Future):
            entry = entry.result()
        self._ready[epoch] = entry  # most recently used last
        following = self.next_epoch(epoch)
        if self.prepare_next and following not in self._ready:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="photoz-next-epoch")
            self._ready[following] = self._pool.submit(self._make, following)
        while len(self._ready) > self.KEEP:  # the least recently used go (their batches hold what they need)
            del self._ready[next(iter(self._ready))]
        return entry


class _OneSource:
    """A single source standing for every epoch (``_Feeder`` given a bare source)."""

    def __init__(self, source) -> None:
        self.template = source

    def get(self, epoch: int):
        return self.template

    def next_epoch(self, epoch: int) -> int:
        return epoch


class _Feeder:
    """Callbacks of the external sources of one pipeline. DALI iteration i is a position (epoch, batch):
    the pass's start, then batch after batch, across epoch boundaries (``EpochSources.next_epoch``).
    ``delivered`` holds (source batch, buffer) and ``delivered_at`` the position of each fed batch."""

    #: threads preparing batches ahead (draws in one while another copies records: both are needed at 40,000
    #: samples/s, ~6 ms per batch of 256)
    THREADS = 2

    def __init__(self, sources: EpochSources | BatchSource, start: int, device: str, epoch: int = 0,
                 ahead: int = 0) -> None:
        self.sources = sources if isinstance(sources, EpochSources) else _OneSource(sources)
        # iterations prepared in the pool (0: in the calling thread, as DALI asks for them)
        self.ahead = max(0, int(ahead))
        self._pool = ThreadPoolExecutor(self.THREADS, thread_name_prefix="photoz-dali-feed") if self.ahead else None
        self._prepared: dict[int, Future] = {}
        self._scheduled = -1  # the last iteration handed to the pool
        self._lock = threading.Lock()  # the buffer pool, shared by the preparing threads and ``release``
        self.device = device
        self.spec = spec = self.sources.template.spec
        self.parts = 1 + (spec.n_views if spec.noise else 0)
        self.pending: dict[int, list] = {}
        self.delivered: deque[tuple[SourceBatch, np.ndarray | None]] = deque()
        self.delivered_at: deque[tuple[int, int]] = deque()
        self._positions: dict[int, tuple[int, int]] = {}
        self._assigned, self._last = -1, (epoch, start - 1)
        self._gpu_table: torch.Tensor | None = None
        # CPU: DALI's warp_affine with a fill value is ~5x slower than with clamped borders, so the
        # records are copied into zero-bordered buffers (1 pixel) and warped with clamping: a sample
        # outside the image then reads only zero pixels, i.e. exactly the zero fill (the matrices
        # shift by one pixel). Buffers return to the pool once their batch's outputs are out.
        # Where no warp can reach past the image (``draws.warp_stays_inside``: small crops, or no rotation)
        # the CPU path needs no border: DALI reads the zero-copy records themselves.
        # GPU: the records are copied into pinned staging buffers instead, so that DALI's host->device
        # copy runs at DMA speed rather than from pageable memory-mapped pages. A staging buffer is reused
        # only after the GPU has produced its batch's outputs (so its copy is complete): ``release`` gets
        # an event recorded after them.
        self.pad = device != "gpu" and not draws.warp_stays_inside(spec)
        # the records' dtype (the store's): DALI is fed it (records, staging and bordered buffers alike) and casts
        # anything but float32 to float32 first (``build_pipeline``)
        dataset = getattr(self.sources.template, "dataset", None)
        self.record_dtype = np.dtype(getattr(dataset, "image_dtype", np.float32))
        self.alloc = functools.partial(_pinned_array, dtype=self.record_dtype)
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
            with self._lock:
                self._free.append((buffer, ready))

    def close(self) -> None:
        """Stop preparing ahead (the pipeline is let go); waits for a batch being prepared."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._prepared.clear()

    def _buffer(self, shape: tuple[int, ...], alloc) -> np.ndarray:
        with self._lock:
            if not self._free:
                buf = ready = None
            else:
                buf, ready = self._free.pop()
        if buf is None:
            return alloc(shape)
        if ready is not None:
            ready.synchronize()  # long complete by now (prefetch_queue_depth batches later): no stall
        return buf

    def _padded(self, images: list[np.ndarray]) -> np.ndarray:
        h, w, c = images[0].shape
        buf = self._buffer((len(images), h + 2, w + 2, c), lambda shape: np.zeros(shape, self.record_dtype))
        for i, rec in enumerate(images):
            buf[i, 1:-1, 1:-1] = rec
        return buf

    def _staged(self, images: list[np.ndarray]) -> np.ndarray:
        h, w, c = images[0].shape
        buf = self._buffer((len(images), h, w, c), self.alloc)
        for i, rec in enumerate(images):
            buf[i] = rec
        return buf

    def successor(self, position: tuple[int, int]) -> tuple[int, int]:
        """The position after ``position``: the next batch, or the first of the next epoch."""
        epoch, k = position
        if k + 1 < len(self.sources.get(epoch)):
            return epoch, k + 1
        return self.sources.next_epoch(epoch), 0

    def _position(self, iteration: int) -> tuple[int, int]:
        while self._assigned < iteration:  # iterations are fed in order
            self._last = self.successor(self._last)
            self._assigned += 1
            self._positions[self._assigned] = self._last
        return self._positions[iteration]

    def _assign(self, iteration: int) -> tuple[tuple[int, int], BatchSource]:
        """(position, its epoch's source) of ``iteration``: in order, in the calling thread (``EpochSources``
        is not shared with the preparing threads)."""
        position = self._position(iteration)
        del self._positions[iteration]
        return position, self.sources.get(position[0])

    def _prepare(self, source: BatchSource, k: int) -> tuple[SourceBatch, np.ndarray | None, list]:
        """The host work of batch ``k``: its draws, its records in a staging (GPU) or bordered (CPU) buffer,
        and the host outputs DALI gets."""
        source_batch = source.batch(k)
        if self.device == "gpu":
            buffer = self._staged(source_batch.images)
        else:
            buffer = self._padded(source_batch.images) if self.pad else None
        out: list = [source_batch.images if buffer is None else buffer]
        for v in source_batch.views:
            matrix = v.matrix
            if self.pad:
                matrix = matrix.copy()
                matrix[:, :, 2] += 1.0
            out += [matrix, v.mult] + ([v.sigma] if v.sigma is not None else [])
        return source_batch, buffer, out

    def _ready(self, iteration: int) -> list:
        """[position, source, source batch, buffer, host outputs] of ``iteration``; with ``ahead``, the
        iterations up to ``iteration + ahead`` are handed to the pool first."""
        if self._pool is None:
            position, source = self._assign(iteration)
            return [position, source, *self._prepare(source, position[1])]
        while self._scheduled < iteration + self.ahead:
            self._scheduled += 1
            position, source = self._assign(self._scheduled)
            self._prepared[self._scheduled] = (position, source, self._pool.submit(self._prepare, source, position[1]))
        position, source, prepared = self._prepared.pop(iteration)
        return [position, source, *prepared.result()]

    def _take(self, iteration: int) -> list:
        """[position, its epoch's source, source batch, buffer, host outputs] of DALI iteration ``iteration``
        (asked for once per external source)."""
        entry = self.pending.get(iteration)
        if entry is None:
            entry = self.pending[iteration] = [*self._ready(iteration), 0]
        entry[-1] += 1
        if entry[-1] == self.parts:
            del self.pending[iteration]
        return entry

    def host(self, info) -> list:
        position, _, source_batch, buffer, out = self._take(info.iteration)[:5]
        self.delivered.append((source_batch, buffer))
        self.delivered_at.append(position)
        return out

    def noise(self, view: int):
        def fields(info):
            _, source, source_batch = self._take(info.iteration)[:3]
            if self.device != "gpu":
                return source_batch.views[view].noise
            out = self._gpu_fields(source, source_batch, view)
            self._hold.setdefault(info.iteration, []).append(out)
            return out

        return fields

    def _gpu_fields(self, source: BatchSource, source_batch: SourceBatch, view: int) -> torch.Tensor:
        """Noise fields built on the GPU (table gather). No synchronisation: DALI copies a torch tensor on
        torch's current stream, after the gather; inputs go up from pinned memory without blocking."""
        spec = source.spec
        if spec.noise_method == "table":
            if self._gpu_table is None or self._gpu_table_key != source.table.key:
                self._gpu_table = torch.from_numpy(source.table.table).cuda()  # once per epoch
                self._gpu_table_key = source.table.key
            offsets = _to_gpu(source_batch.views[view].draws.noise_offset)
            windows = self._gpu_table.unfold(0, spec.field_size, 1)[offsets]
            return windows.view(len(offsets), spec.crop, spec.crop, spec.bands)
        return _to_gpu(np.stack(source_batch.views[view].noise))


def _to_gpu(a: np.ndarray) -> torch.Tensor:
    """A host array on the current GPU via pinned memory, non-blocking (no host wait)."""
    return torch.from_numpy(a).pin_memory().cuda(non_blocking=True)


def build_pipeline(feeder: _Feeder, batch_size: int, num_threads: int, prefetch: int, device_id: int | None):
    """Build the DALI pipeline of ``feeder.spec`` on ``feeder.device``."""
    from nvidia.dali import fn, pipeline_def, types

    spec = feeder.spec
    gpu = feeder.device == "gpu"
    per_view = 3 if spec.noise else 2
    cast = feeder.record_dtype != np.float32  # float16 records: to float32 after the read (GPU: on the device)

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, prefetch_queue_depth=prefetch)
    def pipe():
        host = fn.external_source(
            source=feeder.host, num_outputs=1 + per_view * spec.n_views, batch=True, batch_info=True,
            layout=["HWC"] + [None] * (per_view * spec.n_views), no_copy=True,
            dtype=[types.FLOAT16 if cast else types.FLOAT] + [types.FLOAT] * (per_view * spec.n_views),
        )
        images = host[0].gpu() if gpu else host[0]
        if cast:
            images = fn.cast(images, dtype=types.FLOAT)
        outs = []
        for v in range(spec.n_views):
            matrix, mult = host[1 + per_view * v], host[2 + per_view * v]
            fill = {"fill_value": 0.0} if gpu else {}  # CPU: bordered, or never past the image: clamping == zero fill
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
    """Runs one DALI pipeline for the whole run, fed across epoch boundaries (see the module docstring);
    ``builds`` counts the pipelines built (one per run unless a pass starts out of sequence)."""

    backend = "dali"

    def __init__(self, source: BatchSource, device: str, num_threads: int = 2, prefetch: int = 2) -> None:
        super().__init__(source, device)
        self.num_threads, self.prefetch = num_threads, prefetch
        training = source.spec.pipeline.training
        # training passes go on with the next epoch; evaluation passes repeat their (unshuffled) epoch
        self.sources = EpochSources(source, (lambda e: e + 1) if training else (lambda e: e))
        self.builds = 0
        self._pipe = self._feeder = None
        self._next: tuple[int, int] | None = None  # the position the pipeline delivers next
        self._pass = 0  # a pass abandoned midway must not draw from the pipeline of a later pass
        # False: a new pipeline and an inline epoch preparation at every pass, the behaviour before one
        # pipeline served the whole run (kept for the epoch-boundary A/B in benchmarks/train_throughput.py)
        self.persistent = True
        # batches whose host work is prepared in background threads before DALI asks for them (0: in the
        # training thread, the behaviour before; kept for benchmarks/host_feed.py's A/B)
        self.feed_ahead = prefetch

    def __len__(self) -> int:
        return len(self.sources.get(self.epoch))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if not self.persistent:
            self.close()
            self.sources.clear()
            self.sources.prepare_next = False
        self.source = self.sources.get(self.epoch)  # prepared ahead (no table draw at the boundary)
        return super().__iter__()

    def close(self) -> None:
        """Let the pipeline go (a later pass builds a new one)."""
        if self._feeder is not None:
            self._feeder.close()
        self._pipe = self._feeder = self._next = None

    def _build(self, epoch: int, start: int) -> None:
        self.close()
        feeder = _Feeder(self.sources, start, self.device, epoch, ahead=self.feed_ahead)
        device_id = self.torch_device.index if self.device == "gpu" else None
        self._pipe = build_pipeline(feeder, self.source.batch_size, self.num_threads, self.prefetch, device_id)
        self._feeder, self._next = feeder, (epoch, start)
        self.builds += 1

    def _iterate(self, start: int) -> Iterator[dict[str, torch.Tensor]]:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        n = len(self.source) - start
        if n <= 0:
            return
        epoch = self.epoch
        if self._pipe is None or self._next != (epoch, start):
            self._build(epoch, start)
        self._pass += 1
        mine = self._pass
        spec = self.source.spec
        gpu = self.device == "gpu"
        shape = (self.source.batch_size, spec.crop, spec.crop, spec.bands)
        stream = torch.cuda.current_stream() if gpu else None
        for k in range(start, start + n):
            if mine != self._pass:
                return  # a newer pass took over the pipeline
            pipe, feeder = self._pipe, self._feeder
            try:
                outs = pipe.run()
            except BaseException:
                self.close()
                raise
            (source_batch, buffer), position = feeder.delivered.popleft(), feeder.delivered_at.popleft()
            if position != (epoch, k):
                self.close()
                raise RuntimeError(f"DALI delivered batch {position} where ({epoch}, {k}) was due")
            self._next = feeder.successor(position)
            views = []
            for tl in outs:
                t = torch.empty(shape, dtype=torch.float32, device=self.torch_device)
                feed_ndarray(tl.as_tensor(), t, cuda_stream=stream)
                views.append(t.permute(0, 3, 1, 2))  # (B, C, S, S) view, channels_last strides
            feeder.release(buffer, stream.record_event() if gpu else None)
            yield self.make_batch(source_batch, views)
