"""Shuffle-BN across ranks: un-shuffling restores every rank's own rows exactly, and keys computed
with shuffling equal keys computed without it when BN uses fixed statistics (eval mode)."""

from __future__ import annotations

import argparse
import json

import torch

from photoz_hpc.comm.select import init_comm
from photoz_hpc.config import load_config
from photoz_hpc.models.moco import build_moco


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    comm = init_comm(args.backend, 60.0, "cpu")
    b = 6
    cfg = load_config(None, ["model.arch=resnet18", "model.width=8", "moco.queue_size=24", f"loader.batch_size={b}",
                             "moco.bn_mode=shuffle", "seed=1"])
    torch.manual_seed(0)
    model = build_moco(cfg, comm)
    x = torch.randn(b, 5, 12, 12, generator=torch.Generator().manual_seed(10 + comm.rank))
    x[:, 0, 0, 0] = torch.arange(b) + 100.0 * comm.rank  # tag rows: global row id
    shuffled, unperm = model.batch_shuffle(x, seed=7)
    back = model.batch_unshuffle(shuffled, unperm)
    tags = comm.allgather(shuffled[:, 0, 0, 0].contiguous())
    model.encoder_k.eval()  # fixed BN statistics: per-sample outputs independent of batch composition
    k_shuf = model.encode_keys(x, shuffle_seed=7)
    model.bn_mode = "none"
    k_plain = model.encode_keys(x)
    result = {
        "unshuffle_exact": bool(torch.equal(back, x)),
        "moved_rows": bool(not torch.equal(shuffled, x)),
        "tags": sorted(tags.tolist()),
        "key_max_diff": float((k_shuf - k_plain).abs().max()),
    }
    results = comm.allgather_object(result)
    if comm.rank == 0:
        with open(args.out, "w") as fh:
            json.dump(results, fh)
    comm.shutdown()


if __name__ == "__main__":
    main()
