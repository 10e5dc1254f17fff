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
from photoz_hpc.augment.sampler import EpochPlan, plan_epoch
from photoz_hpc.data.dataset import ShardedDataset
from photoz_hpc.errors import DatasetError


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
        reader: RecordReader | None = None, ids: np.ndarray | None = None,
    ) -> None:
        self.dataset, self.spec, self.batch_size = dataset, spec, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.pool = pipeline_pool(dataset, spec.pipeline) if ids is None else restrict_pool(dataset, spec.pipeline, ids)
        self.reader = reader or RecordReader(dataset)
        self.train = spec.pipeline.training
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
        plan = self.plan = plan_epoch(self.pool, self.batch_size, self.rank, self.world_size, self.seed, epoch, self.train)
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
