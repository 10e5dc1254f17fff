"""Node-local shuffle-BN (``moco.bn_mode=shuffle-node``) on ranks declared as nodes of ``--ranks-per-node``.

Every rank records: the node the communicator found; whether un-shuffling restores its rows and which ranks
its shuffled rows came from; how many collectives its key encoding entered; its keys against (a) keys
computed here by hand from its node's rows, (b) global shuffle-BN (``shuffle``, same weights) and (c) this
rank alone (one process: split BN); and the loss of one forward pass with ``shuffle-node`` and ``shuffle``.
Rank 0 writes every rank's record as JSON.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
import torch.nn.functional as F
from declared_nodes import declare_nodes

from photoz_hpc.comm.base import Comm
from photoz_hpc.comm.select import init_comm
from photoz_hpc.config import load_config
from photoz_hpc.models.moco import MoCo, build_moco

B, SEED = 8, 7


def build(bn_mode: str, comm: Comm, world: int) -> MoCo:
    """The same weights for every BN mode and rank (bn_splits 4: used where a rank shuffles alone)."""
    cfg = load_config(None, ["model.arch=resnet18", "model.width=8", "model.embed_dim=16", f"loader.batch_size={B}",
                             f"moco.queue_size={4 * B * world}", f"moco.bn_mode={bn_mode}", "moco.bn_splits=4",
                             "seed=1"])
    torch.manual_seed(0)
    return build_moco(cfg, comm)


def keys_by_hand(model: MoCo, x: torch.Tensor, comm: Comm) -> torch.Tensor:
    """Our node's rows (from a global gather) in one permutation; each node rank's slice through the key
    encoder (batch statistics of that slice), un-permuted; our rows back."""
    g, first = comm.node_size, comm.rank - comm.node_rank
    rows = comm.allgather(x)[first * B:(first + g) * B]
    perm = torch.randperm(g * B, generator=torch.Generator().manual_seed(SEED))
    encoder = copy.deepcopy(model.encoder_k)  # its BN running statistics move; the model's must not
    keys = torch.empty(g * B, model.dim)
    with torch.no_grad():
        for part in perm.view(g, B):
            keys[part] = F.normalize(encoder(rows[part]).float(), dim=1)
    return keys[comm.node_rank * B:(comm.node_rank + 1) * B]


def encode(model: MoCo, x: torch.Tensor, comm: Comm) -> tuple[torch.Tensor, int]:
    """Keys and the number of collectives their encoding entered."""
    before = comm.calls
    k = model.encode_keys(x, shuffle_seed=SEED)
    return k, comm.calls - before


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--ranks-per-node", type=int, required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    declare_nodes(args.ranks_per_node)
    comm = init_comm(args.backend, 60.0, "cpu", node_groups=True)
    gen = torch.Generator().manual_seed(10 + comm.rank)
    x, xq = torch.randn(B, 5, 12, 12, generator=gen), torch.randn(B, 5, 12, 12, generator=gen)
    x[:, 0, 0, 0] = torch.arange(B) + 100.0 * comm.rank  # tag rows: 100 x rank + row
    node, glob = build("shuffle-node", comm, comm.world), build("shuffle", comm, comm.world)
    alone = build("shuffle", Comm(), 1)
    shuffled, unperm = node.batch_shuffle(x, seed=SEED)
    back = node.batch_unshuffle(shuffled, unperm)
    by_hand = keys_by_hand(node, x, comm)
    k_node, calls_node = encode(node, x, comm)
    k_glob, calls_glob = encode(glob, x, comm)
    k_alone, _ = encode(alone, x, comm)
    loss_node = float(node(xq, x, momentum=0.9, shuffle_seed=SEED)["loss"])
    loss_glob = float(glob(xq, x, momentum=0.9, shuffle_seed=SEED)["loss"])
    record = {
        "rank": comm.rank, "node_size": comm.node_size, "node_rank": comm.node_rank,
        "bn_splits": node.bn_splits, "unshuffle_exact": bool(torch.equal(back, x)),
        "sources": sorted({int(t) // 100 for t in shuffled[:, 0, 0, 0].tolist()}),
        "calls_node": calls_node, "calls_shuffle": calls_glob,
        "diff_by_hand": max_diff(k_node, by_hand), "diff_shuffle": max_diff(k_node, k_glob),
        "diff_alone": max_diff(k_node, k_alone), "loss_node": loss_node, "loss_shuffle": loss_glob,
    }
    records = comm.allgather_object(record)
    if comm.rank == 0:
        with open(args.out, "w") as fh:
            json.dump(records, fh)
    comm.shutdown()


if __name__ == "__main__":
    main()
