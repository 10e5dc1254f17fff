"""Node partitions of a store (``data.partition: node``): which records each node of a job owns.

The deal depends only on the store's shard counts and the number of nodes, so ``photoz-hpc stage`` (run before
training, on every node) and the training loaders compute the same partition without sharing any state:

1. the shards are put in one fixed pseudo-random order (``shard_order``: a permutation seeded by a constant, the
   same for every node count), which breaks the sky order of the inputs (Multimodal Universe files are split by
   HEALPix pixel, and ``prepare`` keeps the input order: shard i is input rows [i*S, (i+1)*S));
2. the records, in that shard order, are cut into ``n_nodes`` consecutive runs of equal length (+-1 record), so
   the nodes are balanced by sample count exactly; a node owns whole shards plus at most two partial ones at
   its ends (shared with the neighbouring node, whose stage copies them too).

A partition is therefore a random set of shards, i.e. of small sky patches when the inputs are in sky order:
with tens of shards per node its redshift and position distributions follow the whole survey's (tested). More,
smaller shards (``prepare --samples-per-shard``) make the mix finer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from photoz_hpc.errors import DatasetError

PARTITIONS = ("global", "node")
#: The marker ``photoz-hpc stage`` writes into a node-local copy that holds only some shards' records.
STAGED_NAME = "staged.json"
_ORDER_SEED = 0x5EED_D0A1  # fixed: the deal is a property of the store and the node count, not of a run


@dataclass(frozen=True)
class Piece:
    """Rows [lo, hi) of shard ``shard``."""

    shard: int
    lo: int
    hi: int


def shard_order(n_shards: int) -> np.ndarray:
    """The fixed pseudo-random order in which shards are dealt (same for every node count)."""
    return np.random.default_rng(np.random.SeedSequence([_ORDER_SEED, int(n_shards)])).permutation(int(n_shards))


def deal(counts: Sequence[int], n_nodes: int) -> list[list[Piece]]:
    """Each node's pieces: the records in ``shard_order`` cut into ``n_nodes`` runs of equal length (+-1)."""
    counts = np.asarray(counts, dtype=np.int64)
    n_nodes = int(n_nodes)
    if n_nodes < 1:
        raise ValueError(f"a job has at least one node, got {n_nodes}")
    total = int(counts.sum())
    if total < n_nodes:
        raise DatasetError(f"{total} samples cannot be dealt to {n_nodes} nodes (data.partition=node)")
    order = shard_order(len(counts))
    ends = np.cumsum(counts[order])  # end position of each shard in the dealt sequence
    starts = ends - counts[order]
    cuts = [total * k // n_nodes for k in range(n_nodes + 1)]
    nodes: list[list[Piece]] = []
    for k in range(n_nodes):
        lo, hi = cuts[k], cuts[k + 1]
        pieces = []
        for j in np.flatnonzero((ends > lo) & (starts < hi)):
            a, b = max(lo, int(starts[j])), min(hi, int(ends[j]))
            pieces.append(Piece(int(order[j]), a - int(starts[j]), b - int(starts[j])))
        nodes.append(pieces)
    return nodes


def node_shards(counts: Sequence[int], n_nodes: int, node: int) -> list[int]:
    """The shards node ``node`` must hold (sorted): those its partition touches."""
    return sorted({p.shard for p in deal(counts, n_nodes)[node]})


def node_of(counts: Sequence[int], dealt: list[list[Piece]], ids: np.ndarray) -> np.ndarray:
    """The node each dataset id (global sample index) is dealt to by ``dealt`` (``deal(counts, n_nodes)``): one
    sorted lookup over the pieces, so a rank places a pool of tens of millions of ids without building every
    node's id list."""
    offsets = np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64))])
    starts, owners = [], []
    for k, pieces in enumerate(dealt):
        for piece in pieces:
            starts.append(offsets[piece.shard] + piece.lo)
            owners.append(k)
    order = np.argsort(starts, kind="stable")
    starts_sorted, owners_sorted = np.asarray(starts, np.int64)[order], np.asarray(owners, np.int64)[order]
    return owners_sorted[np.searchsorted(starts_sorted, np.asarray(ids, dtype=np.int64), side="right") - 1]


def node_ids(counts: Sequence[int], n_nodes: int) -> list[np.ndarray]:
    """Each node's dataset ids (global sample indices, sorted): disjoint, and together every sample once."""
    offsets = np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64))])
    out = []
    for pieces in deal(counts, n_nodes):
        ids = [np.arange(offsets[p.shard] + p.lo, offsets[p.shard] + p.hi, dtype=np.int64) for p in pieces]
        out.append(np.sort(np.concatenate(ids)) if ids else np.zeros(0, np.int64))
    return out


@dataclass(frozen=True)
class StagedCopy:
    """What ``staged.json`` says of a node-local copy: whose partition it holds and which shards are present."""

    path: Path
    partition: str
    node: int
    nodes: int
    shards: frozenset[int]
    source: str

    def describe(self) -> str:
        if self.partition == "node":
            return f"the node-local copy {self.path.parent} of node {self.node} of {self.nodes} (data.partition=node)"
        return f"the node-local copy {self.path.parent}"


def read_staged(root: str | Path) -> StagedCopy | None:
    """The ``staged.json`` marker of a dataset directory, or None for a complete store."""
    path = Path(root) / STAGED_NAME
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
        partition, node, nodes = str(info["partition"]), int(info["node"]), int(info["nodes"])
        shards = frozenset(int(s) for s in info["shards"])
        source = str(info.get("source", ""))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"{path}: unreadable staging marker ({exc})") from None
    if partition not in PARTITIONS or not 0 <= node < nodes:
        raise DatasetError(f"{path}: staging marker has partition {partition!r}, node {node} of {nodes}")
    return StagedCopy(path, partition, node, nodes, shards, source)
