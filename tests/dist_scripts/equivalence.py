"""Run a few MoCo steps with a fixed global batch and queue; rank 0 saves per-step records.

Launched by tests/test_dist_*.py as 1 process (backend none), 2 gloo processes (backend torch) or
under ``horovodrun --gloo -np 2`` (backend horovod). Same initial weights (same seed), same global
batch per step (each rank takes its rows), same queue content (sharded with ``shard_queue``).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from photoz_hpc.comm.select import init_comm
from photoz_hpc.config import load_config
from photoz_hpc.models.queue import shard_queue, unshard_queue
from photoz_hpc.train.pretrain import Trainer

GLOBAL_BATCH, QUEUE, DIM, CROP = 16, 64, 16, 16


class _NameRecorder:
    """Stands in for ``horovod.torch`` and records the ``name`` of every explicit collective."""

    def __init__(self, hvd, sink: list[str]) -> None:
        self._hvd, self._sink = hvd, sink

    def __getattr__(self, attr: str):
        fn = getattr(self._hvd, attr)
        if attr not in ("allreduce", "allgather", "allgather_object", "broadcast_object"):
            return fn

        def recorded(*args, **kw):
            self._sink.append(kw.get("name"))
            return fn(*args, **kw)

        return recorded


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="sharded", choices=["sharded", "replicated", "local"])
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--channels-last", default="false", choices=["true", "false"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                    help="float64: parameters, inputs and queue in fp64 (reduction-order noise ~1e-15)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_default_dtype(getattr(torch, args.dtype))  # before the model, queue and inputs are made
    comm = init_comm(args.backend, 60.0, "cpu")
    world, rank = comm.world, comm.rank
    b = GLOBAL_BATCH // world
    cfg = load_config(None, [
        "model.arch=resnet18", "model.width=8", f"model.embed_dim={DIM}", "model.head_hidden_dim=32",
        f"moco.queue_size={QUEUE}", f"moco.queue_mode={args.mode}", "moco.bn_mode=sync", "moco.momentum=0.9",
        f"loader.batch_size={b}", "optim.lr=0.2", f"optim.batch_ref={GLOBAL_BATCH}", "optim.schedule=constant",
        f"train.precision={args.precision}", f"dist.backend={args.backend}", "seed=3",
        f"model.channels_last={args.channels_last}",
    ])
    tr = Trainer(cfg, comm, torch.device("cpu"), steps_per_epoch=100)
    names: list[str] = []  # Horovod: the names of the explicit collectives (of the current step)
    if comm.name == "horovod":
        comm.hvd = _NameRecorder(comm.hvd, names)
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
        names.clear()
        res = tr.train_step(x1[rows], x2[rows])
        step_names = list(names)
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
            "memory_format": tr.memory_format,
            "conv_weight_channels_last": tr.model.encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last)
            and not tr.model.encoder.conv1.weight.is_contiguous(),
            "collective_names": step_names,
        })
    if rank == 0:
        torch.save({"world": world, "backend": comm.name, "dtype": args.dtype, "records": records}, args.out)
    comm.shutdown()


if __name__ == "__main__":
    main()
