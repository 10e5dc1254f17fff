"""The host side shared by both loaders: raw records, labels and augmentation inputs of one batch.

``BatchSource.batch(k)`` is a pure function of (seed, epoch, rank, k): it reads the records of the
plan's batch k straight from the memory-mapped shards (zero-copy views, one lookup per batch; DALI's
CPU path warps them in place or copies them into bordered buffers, its GPU path into pinned ones) and
builds every view's matrices, multipliers, sigmas and noise fields from ``draws``. Records are
CRC-checked the first time this process reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from photoz_hpc.augment import draws
from photoz_hpc.augment.pipelines import LABELS, Pipeline
from photoz_hpc.augment.sampler import EpochPlan, NodeSplit, plan_epoch
from photoz_hpc.data.dataset import ShardedDataset
from photoz_hpc.data.partition import deal, node_of
from photoz_hpc.errors import ConfigError, DatasetError
from photoz_hpc.logs import get_logger

log = get_logger(__name__)
#: Fewer shards than this per node draw a WARNING (each node's share would be a mix of few sky patches).
FEW_SHARDS_PER_NODE = 32
#: Node partitions must let an epoch visit at least this share of the pool (n_nodes x the smallest node's pool).
MIN_VISITED = 0.9


@dataclass
class ViewInputs:
    """What a backend needs to produce one view of a batch (HWC order, float32)."""

    draws: draws.ViewDraws
    matrix: np.ndarray  # (B, 2, 3) destination-to-source
    mult: np.ndarray  # (B, 1, 1, C)
    sigma: np.ndarray | None  # (B, 1, 1, C), None without noise
    noise: list[np.ndarray] | None  # B fields (S, S, C), None without noise


@dataclass
class SourceBatch:
    """One batch before augmentation: raw records plus labels and the views' inputs."""

    index: np.ndarray  # (B,) int64 dataset ids (PAD_ID on padding rows)
    valid: np.ndarray  # (B,) bool
    images: list[np.ndarray]  # B records (H, W, C) float32
    views: list[ViewInputs]
    labels: dict[str, np.ndarray] = field(default_factory=dict)  # the pipeline's label_keys, (B,) each


class RecordReader:
    """Zero-copy access to records by dataset id; each record is CRC-checked the first time the
    dataset object reads it (``ShardedDataset.image_hwc``), shared by every loader of that object."""

    def __init__(self, dataset: ShardedDataset, verify: bool = True) -> None:
        self.dataset = dataset
        self.verify = verify

    def records(self, ids: np.ndarray) -> list[np.ndarray]:
        return self.dataset.records_hwc(ids, self.verify)


class ReadStats:
    """What a loader delivered from the store: records (padding rows read a real record too), their bytes and
    the shard files they lie in. Counted in the training process as batches are handed out, whatever thread,
    worker process or DALI queue read them ahead (those may have read a few batches more)."""

    def __init__(self, dataset: ShardedDataset) -> None:
        self.dataset = dataset
        self.n_records = 0
        self.touched = np.zeros(len(dataset.shards), dtype=bool)

    def add(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64) % max(len(self.dataset), 1)
        self.touched[np.searchsorted(self.dataset.offsets, ids, side="right") - 1] = True
        self.n_records += len(ids)

    def stats(self) -> dict:
        """Records and bytes so far, and the shard files touched as a range list (``"0-3,7"``)."""
        touched = np.flatnonzero(self.touched)
        return {"records": self.n_records, "bytes": self.n_records * self.dataset.record_bytes,
                "shard_files": len(touched), "shards": ranges(touched), "root": str(self.dataset.root)}


def ranges(numbers: np.ndarray) -> str:
    """Sorted integers as a compact range list: [0, 1, 2, 5, 7, 8] -> ``"0-2,5,7-8"``."""
    parts, numbers = [], [int(n) for n in numbers]
    start = prev = None
    for n in [*numbers, None]:
        if start is not None and (n is None or n != prev + 1):
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = None
        if n is not None and start is None:
            start = n
        prev = n
    return ",".join(parts)


def node_split(dataset: ShardedDataset, pool: np.ndarray, rank: int, world_size: int, ranks_per_node: int) -> NodeSplit:
    """This rank's node partition of ``pool`` (``data.partition: node``; ``photoz_hpc.data.partition`` deals the
    store's shards to ``world_size / ranks_per_node`` nodes). A node-local copy staged for another node, or for
    another node count, is an error naming it: it lacks the records this rank would read. So is a pool the deal
    splits unevenly (a labeled subset or split clustered on the sky): every rank keeps the smallest node's
    batches, so the larger nodes' surplus would go unseen every epoch."""
    if ranks_per_node < 1 or world_size % ranks_per_node:
        raise ConfigError(f"data.partition=node: {world_size} ranks cannot be split into nodes of {ranks_per_node}")
    n_nodes, node = world_size // ranks_per_node, rank // ranks_per_node
    staged = dataset.staged
    if staged is not None and staged.partition == "node" and (staged.node, staged.nodes) != (node, n_nodes):
        raise DatasetError(f"{staged.path}: staged for node {staged.node} of {staged.nodes}, but rank {rank} is on node "
                           f"{node} of {n_nodes} (nodes of {ranks_per_node} consecutive ranks): stage with this job's "
                           "node layout (photoz-hpc stage --node K --nodes N, as PHOTOZ_STAGE=1 does)")
    counts = [s["count"] for s in dataset.shards]
    pool = np.unique(np.asarray(pool, dtype=np.int64))
    dealt = deal(counts, n_nodes)
    owner = node_of(counts, dealt, pool)
    sizes = tuple(int(n) for n in np.bincount(owner, minlength=n_nodes))
    visited = n_nodes * min(sizes) / max(len(pool), 1)
    if n_nodes > 1 and visited < MIN_VISITED:
        raise ConfigError(f"data.partition=node over {n_nodes} nodes splits this pool of {len(pool)} samples of "
                          f"{dataset.root} unevenly (smallest node {min(sizes)}, largest {max(sizes)}): every rank keeps "
                          f"the smallest node's batches, so an epoch would visit only {100 * visited:.0f}% of it. The deal "
                          "balances the whole store; a subset clustered in it (labels, a split) needs data.partition=global")
    if n_nodes > 1 and rank == 0:
        fewest = min(len({p.shard for p in node_pieces}) for node_pieces in dealt)
        if fewest < FEW_SHARDS_PER_NODE:
            log.warning("data.partition=node: some nodes get only %d shards of %s; a shard is a run of consecutive "
                        "input rows (a patch of sky for inputs in sky order), so each node's share is a mix of only %d "
                        "patches. Re-prepare with a smaller --samples-per-shard for a finer mix (docs/data_at_scale.md)",
                        fewest, dataset.root, fewest)
    return NodeSplit(pool[owner == node], sizes, node, ranks_per_node)


def pipeline_pool(dataset: ShardedDataset, pipeline: Pipeline) -> np.ndarray:
    """Dataset ids a pipeline may use: all, or those with a spectroscopic redshift (``labeled_only``)."""
    if not pipeline.labeled_only:
        return np.arange(len(dataset), dtype=np.int64)
    pool = np.flatnonzero(np.isfinite(dataset.meta["specz_redshift"])).astype(np.int64)
    if len(pool) == 0:
        raise DatasetError(f"{dataset.root}: no sample has a spectroscopic redshift; the {pipeline.name} pipeline needs labels")
    return pool


def restrict_pool(dataset: ShardedDataset, pipeline: Pipeline, ids: np.ndarray) -> np.ndarray:
    """An explicit id list (a label subset, a validation split), checked against the dataset."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim != 1 or len(ids) == 0:
        raise DatasetError(f"{dataset.root}: the {pipeline.name} id list is empty or not 1-d")
    if ids.min() < 0 or ids.max() >= len(dataset):
        raise DatasetError(f"{dataset.root}: {pipeline.name} ids outside [0, {len(dataset)})")
    if pipeline.labeled_only and not np.isfinite(dataset.meta["specz_redshift"][ids]).all():
        raise DatasetError(f"{dataset.root}: some {pipeline.name} ids have no spectroscopic redshift")
    return ids


class BatchSource:
    """Batches of one rank and epoch, as pure functions of the batch number."""

    def __init__(
        self, dataset: ShardedDataset, spec: draws.AugmentSpec, batch_size: int, rank: int, world_size: int, seed: int,
        reader: RecordReader | None = None, ids: np.ndarray | None = None, ranks_per_node: int | None = None,
    ) -> None:
        """``ranks_per_node``: node partitions (``data.partition: node``) with nodes of that many consecutive
        ranks, for training pipelines; None: the global plan."""
        self.dataset, self.spec, self.batch_size = dataset, spec, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.pool = pipeline_pool(dataset, spec.pipeline) if ids is None else restrict_pool(dataset, spec.pipeline, ids)
        self.reader = reader or RecordReader(dataset)
        self.train = spec.pipeline.training
        self.nodes = (node_split(dataset, self.pool, rank, world_size, ranks_per_node)
                      if ranks_per_node is not None and self.train else None)
        staged = dataset.staged
        if self.train and self.nodes is None and staged is not None and staged.partition == "node" and staged.nodes > 1:
            raise DatasetError(f"{staged.path}: {staged.describe()} holds only that node's shards; this "
                               f"{spec.pipeline.name} run uses data.partition=global, which reads every shard (set "
                               "data.partition=node, or read the complete store)")
        self.epoch = -1
        self.plan: EpochPlan | None = None
        self.table: draws.NoiseTable | None = None
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Plan the epoch and gather, for all its batches at once, the ids to read (padding rows read the
        batch's first valid sample), labels and SFD E(B-V): ``batch(k)`` then only slices them. The loaders
        call this ahead of the epoch in a background thread; ``batch`` runs in the training thread."""
        if epoch == self.epoch:
            return
        plan = self.plan = plan_epoch(self.pool, self.batch_size, self.rank, self.world_size, self.seed, epoch, self.train,
                                      self.nodes)
        self.table = draws.NoiseTable(self.spec, self.seed, epoch, self.rank) if self.spec.noise else None
        first = plan.ids[np.arange(len(plan)), plan.valid.argmax(axis=1)]  # each batch's first valid id
        self.read_ids = np.where(plan.valid, plan.ids, np.where(plan.valid.any(axis=1), first, 0)[:, None])
        meta = self.dataset.meta
        self.ebv_sfd = meta["ebv_sfd"][self.read_ids] if self.spec.deredden else None
        keys = self.spec.pipeline.label_keys
        z = meta["specz_redshift"][self.read_ids] if keys else None
        self.labels = {key: LABELS[key](z, self.spec.grid) for key in keys}
        self.epoch = epoch  # last: a set_epoch that failed midway is redone, not taken as done

    def __len__(self) -> int:
        return len(self.plan)

    @property
    def partition(self) -> dict:
        """How this source's epochs are dealt: ``{"partition": "global"}`` or node partitions with their layout."""
        if self.nodes is None:
            return {"partition": "global"}
        return {"partition": "node", "nodes": self.nodes.n_nodes, "node": self.nodes.node,
                "ranks_per_node": self.nodes.ranks_per_node}

    def batch(self, k: int) -> SourceBatch:
        spec = self.spec
        index, valid, read_ids = self.plan.ids[k], self.plan.valid[k], self.read_ids[k]
        rng = draws.generator(self.seed, draws.StreamTag.DRAWS, self.epoch, self.rank, k)
        ebv_sfd = self.ebv_sfd[k] if spec.deredden else None
        views = []
        for v, view in enumerate(draws.draw_views(spec, rng, len(index), ebv_sfd)):
            mult = draws.band_multipliers(spec, view.ebv)[:, None, None, :]
            sigma = noise = None
            if spec.noise:
                sigma = draws.noise_sigmas(spec, view.scale)[:, None, None, :]
                noise = self.table.fields(view.noise_offset, k, v)
            views.append(ViewInputs(view, draws.affine_matrices(spec, view.angle, view.shift), mult, sigma, noise))
        labels = {key: values[k].copy() for key, values in self.labels.items()}  # batches never alias the epoch's
        return SourceBatch(index=index, valid=valid, images=self.reader.records(read_ids), views=views, labels=labels)
