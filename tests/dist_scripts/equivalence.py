"""Run a few MoCo steps with a fixed global batch and queue; rank 0 saves per-step records.

Launched by tests/test_dist_*.py as 1 process (backend none), 2 gloo processes (backend torch) or
under ``horovodrun --gloo -np 2`` (backend horovod). Same initial weights (same seed), same global
batch per step (each rank takes its rows), same queue content (sharded with ``shard_queue``).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from photoz_hpc.config import load_config
from photoz_hpc.models.queue import shard_queue, unshard_queue
from photoz_hpc.train.dist import init_comm
from photoz_hpc.train.pretrain import Trainer

GLOBAL_BATCH, QUEUE, DIM, CROP = 16, 64, 16, 16


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="sharded", choices=["sharded", "replicated", "local"])
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    comm = init_comm(args.backend, 60.0, "cpu")
    world, rank = comm.world, comm.rank
    b = GLOBAL_BATCH // world
    cfg = load_config(None, [
        "model.arch=resnet18", "model.width=8", f"model.embed_dim={DIM}", "model.head_hidden_dim=32",
        f"moco.queue_size={QUEUE}", f"moco.queue_mode={args.mode}", "moco.bn_mode=sync", "moco.momentum=0.9",
        f"loader.batch_size={b}", "optim.lr=0.2", f"optim.batch_ref={GLOBAL_BATCH}", "optim.schedule=constant",
        f"train.precision={args.precision}", f"dist.backend={args.backend}", "seed=3",
    ])
    tr = Trainer(cfg, comm, torch.device("cpu"), steps_per_epoch=100)
    if tr.precision.scaler is not None:  # a small initial scale: no overflow-skipped steps to compare
        tr.precision.scaler = torch.amp.GradScaler("cpu", init_scale=64.0)
    full = F.normalize(torch.randn(DIM, QUEUE, generator=torch.Generator().manual_seed(123)), dim=0)
    with torch.no_grad():
        tr.model.queue.copy_(full if (args.mode == "replicated" or world == 1) else shard_queue(full, rank, world, b))
    records = []
    for step in range(args.steps):
        g = torch.Generator().manual_seed(1000 + step)
        x1 = torch.randn(GLOBAL_BATCH, 5, CROP, CROP, generator=g)
        x2 = x1.flip(-1) + 0.3 * torch.randn(x1.shape, generator=g)
        rows = slice(rank * b, (rank + 1) * b)
        res = tr.train_step(x1[rows], x2[rows])
        loss = comm.allreduce(res["loss"].reshape(1), "mean")
        queue = tr.model.queue.detach()
        if args.mode != "replicated" and world > 1:
            queue = unshard_queue(list(comm.allgather(queue.unsqueeze(0))), b)
        records.append({
            "loss": float(loss),
            "grads": torch.cat([p.grad.flatten() for p in tr.params]).clone(),
            "weights": torch.cat([p.detach().flatten() for p in tr.model.parameters()]).clone(),
            "queue": queue.clone(),
            "ptr": int(tr.model.queue_ptr) * (1 if args.mode == "replicated" else world),
        })
    if rank == 0:
        torch.save({"world": world, "backend": comm.name, "records": records}, args.out)
    comm.shutdown()


if __name__ == "__main__":
    main()
