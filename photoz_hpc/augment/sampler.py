"""Which sample ids each rank reads in each batch of an epoch: sharding, shuffling, dropping, padding.

Training (pretrain/finetune): one global permutation per (seed, epoch), dealt round-robin to the
ranks (``shard_id = rank``, ``num_shards = world``), every rank keeps the same number of full
batches (drop-last), so ranks stay in lockstep and their ids are disjoint. With node partitions
(``data.partition: node``, a ``NodeSplit``) node k permutes only its own pool, with its own stream
(seed, epoch, k), and its ranks deal that round-robin; every rank keeps the batches of the smallest node
(the nodes are balanced to +-1 sample, so that is the same drop-last). A job of one node is exactly the
global plan. Evaluation: rank r reads
the contiguous block r of the ids, unshuffled; batches are padded (``valid`` False, id -1) so every
rank has the same number of batches and every sample is read exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from photoz_hpc.augment.draws import StreamTag, generator

PAD_ID = -1


@dataclass(frozen=True)
class NodeSplit:
    """Node partitions of a training pool: this rank's node's pool ids (sorted), every node's pool size, this
    rank's node and the ranks per node (nodes are blocks of consecutive ranks: rank = node * ranks_per_node +
    local rank)."""

    pool: np.ndarray
    sizes: tuple[int, ...]
    node: int
    ranks_per_node: int

    @property
    def n_nodes(self) -> int:
        return len(self.sizes)


@dataclass(frozen=True)
class EpochPlan:
    """ids (n_batches, B) int64 (PAD_ID for padding) and valid (n_batches, B) bool of one rank."""

    ids: np.ndarray
    valid: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def eval_block(pool_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """[lo, hi) of the pool positions rank ``rank`` reads in evaluation (contiguous, ceil(n / world) each)."""
    per_rank = -(-pool_size // world_size)
    return min(pool_size, rank * per_rank), min(pool_size, (rank + 1) * per_rank)


def batches_per_epoch(pool_size: int, batch_size: int, world_size: int, train: bool) -> int:
    """Batches each rank gets per epoch (the same on every rank)."""
    if train:
        return (pool_size // world_size) // batch_size
    per_rank = -(-pool_size // world_size)
    return -(-per_rank // batch_size)


def plan_epoch(
    pool: np.ndarray, batch_size: int, rank: int, world_size: int, seed: int, epoch: int, train: bool,
    nodes: NodeSplit | None = None,
) -> EpochPlan:
    """The batches of one rank for one epoch; ``pool`` is the dataset ids this pipeline may use (with ``nodes``,
    of which ``nodes.pool`` is this node's share). ``nodes`` applies to training plans; evaluation always reads
    globally."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    if train and nodes is not None and nodes.n_nodes > 1:
        return _plan_node(nodes, batch_size, rank, world_size, seed, epoch)
    pool = np.asarray(pool, dtype=np.int64)
    n_batches = batches_per_epoch(len(pool), batch_size, world_size, train)
    if train:
        perm = pool[generator(seed, StreamTag.SHUFFLE, epoch).permutation(len(pool))]
        mine = perm[rank::world_size][: n_batches * batch_size]
        ids = mine.reshape(n_batches, batch_size)
        return EpochPlan(ids, np.ones_like(ids, dtype=bool))
    lo, hi = eval_block(len(pool), rank, world_size)
    mine = pool[lo:hi]
    ids = np.full(n_batches * batch_size, PAD_ID, dtype=np.int64)
    ids[: len(mine)] = mine
    ids = ids.reshape(n_batches, batch_size)
    return EpochPlan(ids, ids != PAD_ID)


def _plan_node(nodes: NodeSplit, batch_size: int, rank: int, world_size: int, seed: int, epoch: int) -> EpochPlan:
    per_node = nodes.ranks_per_node
    if per_node * nodes.n_nodes != world_size or rank // per_node != nodes.node:
        raise ValueError(f"rank {rank} of {world_size} is not on node {nodes.node} of {nodes.n_nodes} x {per_node} ranks")
    n_batches = min(nodes.sizes) // per_node // batch_size
    mine = nodes.pool
    perm = mine[generator(seed, StreamTag.SHUFFLE, epoch, nodes.node).permutation(len(mine))]
    ids = perm[rank % per_node::per_node][: n_batches * batch_size].reshape(n_batches, batch_size)
    return EpochPlan(ids, np.ones_like(ids, dtype=bool))
