"""What both loaders share: epoch/position bookkeeping, exact resume, and the batch dict
(its keys: ``pipelines.Pipeline.keys``).

A loader's whole random state is (seed, epoch, position): every batch is a pure function of them
(see ``source.py``), so ``state_dict`` is three integers plus a consistency check, and a resumed
run continues at the same position with the same random stream, whatever the backend.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from photoz_hpc.augment.pipelines import Pipeline
from photoz_hpc.augment.source import BatchSource, ReadStats, SourceBatch
from photoz_hpc.errors import ConfigError


class LoaderBase:
    """``set_epoch``, ``len``, ``state_dict``/``load_state_dict`` and iteration over batch numbers."""

    backend = "base"

    def __init__(self, source: BatchSource, device: str) -> None:
        self.source = source
        self.device = device
        self.torch_device = torch.device("cuda", torch.cuda.current_device()) if device == "gpu" else torch.device("cpu")
        self.epoch = 0
        self.position = 0  # batches of the current epoch already delivered
        self._start = 0
        self._reads: ReadStats | None = None  # what the delivered batches read (summary.json 'reads')

    @property
    def reads(self) -> ReadStats:
        if self._reads is None:
            self._reads = ReadStats(self.source.dataset)
        return self._reads

    @property
    def pipeline(self) -> Pipeline:
        return self.source.spec.pipeline

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (its shuffle, draws and noise table) and rewind to its first batch."""
        self.epoch, self.position, self._start = int(epoch), 0, 0

    def __len__(self) -> int:
        self.source.set_epoch(self.epoch)
        return len(self.source)

    def state_dict(self) -> dict:
        source = self.source
        return {
            "epoch": self.epoch, "batch": self.position, "seed": source.seed, "rank": source.rank,
            "world_size": source.world_size, "batch_size": source.batch_size, "pipeline": self.pipeline.name,
            "partition": source.partition,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume: the next iteration starts at ``state['batch']`` of ``state['epoch']`` (the training loop checks
        ``check_partition`` first, for a run that is not finished yet)."""
        source = self.source
        for key, have in (("seed", source.seed), ("world_size", source.world_size), ("batch_size", source.batch_size),
                          ("pipeline", self.pipeline.name)):
            if key in state and state[key] != have:
                raise ConfigError(f"loader state has {key}={state[key]!r} but this loader has {have!r}: cannot resume exactly")
        self.epoch = int(state["epoch"])
        self.position = self._start = int(state["batch"])

    def check_partition(self, state: dict) -> None:
        """A checkpoint's data order continues only under the same partition (``data.partition``) and, for node
        partitions, the same node layout: the deal is per node count, so another one would revisit some samples
        and skip others in the resumed epoch. A state from before partitions existed is global."""
        saved, have = _effective(state.get("partition", {"partition": "global"})), _effective(self.source.partition)
        if saved == have:
            return
        raise ConfigError(f"cannot resume exactly: the checkpoint's data order was dealt with {_layout(saved)}, "
                          f"this run has {_layout(have)}; node partitions are dealt per node layout, so resume on the same "
                          "nodes and ranks per node (or start a new out_dir)")

    def read_stats(self) -> dict:
        """What this loader read from the store so far (``RecordReader.stats``) and how its epochs are dealt."""
        return {**self.reads.stats(), **self.source.partition}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self.source.set_epoch(self.epoch)
        start, self._start = self._start, 0
        self.position = start
        for batch in self._iterate(start):
            self.reads.add(self.source.read_ids[self.position])
            self.position += 1
            yield batch

    def _iterate(self, start: int) -> Iterator[dict[str, torch.Tensor]]:
        raise NotImplementedError

    def make_batch(self, source_batch: SourceBatch, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The pipeline's batch dict (``Pipeline.keys``) from the augmented views (B, C, S, S): the labels on the
        loader's device (``to_device``: no stream sync), ``index`` and ``valid`` on the host, where their readers
        want them (training never uses them; evaluation writes them out)."""
        pipeline = self.pipeline
        out: dict[str, torch.Tensor] = dict(zip(pipeline.view_keys, views, strict=True))
        for key in pipeline.label_keys:
            out[key] = to_device(torch.from_numpy(np.ascontiguousarray(source_batch.labels[key])), self.torch_device)
        out["index"] = torch.from_numpy(np.ascontiguousarray(source_batch.index, dtype=np.int64))
        if not pipeline.training:
            out["valid"] = torch.from_numpy(np.ascontiguousarray(source_batch.valid))
        return out


def _effective(partition: dict) -> tuple:
    """What decides the data order: node partitions of one node are the global plan (tested bit for bit)."""
    if partition.get("partition") != "node" or partition.get("nodes") == 1:
        return ("global",)
    return ("node", partition.get("nodes"), partition.get("ranks_per_node"))


def _layout(effective: tuple) -> str:
    if effective[0] != "node":
        return "data.partition=global (or node partitions of one node)"
    return f"data.partition=node over {effective[1]} nodes of {effective[2]} rank(s)"


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without blocking: a copy from pageable memory synchronises the stream (the host
    waits for every kernel queued), one from pinned memory with ``non_blocking`` does not. On a CPU: ``t`` itself."""
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)
