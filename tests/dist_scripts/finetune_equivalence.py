"""A few fine-tuning steps on a fixed global batch, then a validation pass; rank 0 saves the records.

1 process (backend none) vs 2 gloo processes (torch) or ``horovodrun --gloo -np 2``: same initial
weights (same seed), same global batch per step (rank r takes rows r, r+W, ...). BatchNorm over a
rank's half-batch is matched on one process by split BatchNorm over the same rows (sub-batch s =
rows s, s+W, ...), and the validation pass must return every validation galaxy exactly once.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from photoz_hpc.comm.select import init_comm
from photoz_hpc.config import FinetuneRunConfig, load_config
from photoz_hpc.models.resnet import convert_split_bn
from photoz_hpc.train.finetune import FinetuneTask, finetune_loaders, select_data

GLOBAL_BATCH, CROP, SIMULATED_WORLD = 16, 16, 2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    comm = init_comm(args.backend, 60.0, "cpu")
    world, rank = comm.world, comm.rank
    b = GLOBAL_BATCH // world
    cfg = load_config(None, [
        "model.arch=resnet18", "model.width=8", f"augment.crop_size={CROP}", "augment.jitter_max=2",
        f"loader.batch_size={b}", "loader.backend=reference", "finetune.eval_batch_size=5", "optim.lr=0.1",
        f"optim.batch_ref={GLOBAL_BATCH}", "optim.schedule=constant", "train.precision=fp32",
        f"dist.backend={args.backend}", f"data.path={args.data}", f"out_dir={args.out}.run", "seed=3",
    ], root=FinetuneRunConfig)
    data = select_data(cfg)
    _, val_loader = finetune_loaders(cfg, comm, data)
    task = FinetuneTask(cfg, comm, torch.device("cpu"), 100, data, val_loader)
    if world == 1:  # per-rank BatchNorm statistics of SIMULATED_WORLD ranks (the same Parameters)
        convert_split_bn(task.model, SIMULATED_WORLD)
    records = []
    for step in range(args.steps):
        g = torch.Generator().manual_seed(1000 + step)
        x = torch.randn(GLOBAL_BATCH, 5, CROP, CROP, generator=g)
        z_bin = torch.randint(0, 180, (GLOBAL_BATCH,), generator=g)
        rows = slice(rank, None, world) if world > 1 else slice(None)
        res = task.train_batch({"image": x[rows], "z_bin": z_bin[rows]})
        loss = comm.allreduce(res["loss"].reshape(1), "mean")
        records.append({"loss": float(loss), "lr": [g["lr"] for g in task.optimizer.param_groups],
                        "weights": torch.cat([p.detach().flatten() for p in task.model.parameters()]).clone()})
    val = task.validate()
    from photoz_hpc.train.inference import predict

    pred = predict(task.model, val_loader, comm, torch.device("cpu"))
    if rank == 0:
        # plain data (arrays as tensors): the test reads it with torch.load(weights_only=True)
        torch.save({"world": world, "backend": comm.name, "records": records, "val": val,
                    "index": torch.from_numpy(pred["index"]), "z_phot": torch.from_numpy(pred["z_phot"]),
                    "val_ids": torch.as_tensor(np.asarray(data.val_ids))}, args.out)
    comm.shutdown()


if __name__ == "__main__":
    main()
