"""What the training thread spends inside the loader per step, and how much of it is the loader's own host work.

  python benchmarks/loader_wait.py --data DIR [--config CFG] [--pipeline finetune] [--ids IDS.npy]
      [--compute-ms 35] [--epochs 4] [--json OUT] [key=value ...]

Between batches the script keeps the training thread busy for ``--compute-ms`` with matrix products (torch
intra-op threads by the trainer's rule, ``train.runtime.set_cpu_threads``), standing in for a training step:
on a CPU the loader's Python runs in the same thread as the step, so the data wait is that work, done with
caches the step has just evicted. Two loaders of the same config, run in turn:

* ``real``: ``build_loader`` as the trainer builds it;
* ``same-batch``: the same loader whose source returns its first batch at every position, so no draws and no
  record lookups run: what is left is DALI's own cost per iteration (feeding the external source, scheduling,
  the output copy) and the loader's bookkeeping, the floor any host-side change can reach.

Epoch 0 is a warm-up (records CRC-checked, pipeline built); the first step of each later epoch is reported
apart from the others.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def measure(loader, epochs: int, compute) -> dict:
    """Per-step time blocked in ``next`` (ms): mean of the epochs' first steps and of the others (epoch 0 excluded)."""
    first, rest = [], []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        it = iter(loader)
        k = 0
        while True:
            t0 = time.perf_counter()
            try:
                next(it)
            except StopIteration:
                break
            wait = time.perf_counter() - t0
            if epoch > 0:
                (first if k == 0 else rest).append(wait)
            k += 1
            compute()
    return {"steady_ms": 1e3 * float(np.mean(rest)), "steady_median_ms": 1e3 * float(np.median(rest)),
            "epoch_start_ms": 1e3 * float(np.mean(first)), "steps": len(rest) + len(first)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="a prepared store")
    ap.add_argument("--config", default=None, help="the run's YAML (a fine-tuning config for --pipeline finetune)")
    ap.add_argument("--pipeline", default="finetune", help="pretrain | finetune | eval")
    ap.add_argument("--ids", type=Path, default=None, help=".npy of the sample ids (e.g. a fine-tuning run's train_ids.npy)")
    ap.add_argument("--compute-ms", type=float, default=35.0, help="busy time per step standing in for the training step")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("overrides", nargs="*", help="config key=value")
    args = ap.parse_args(argv)
    if args.epochs < 2:
        ap.error("--epochs must be >= 2 (epoch 0 is the warm-up)")

    import torch

    from photoz_hpc.augment import source as source_mod
    from photoz_hpc.augment.loaders import build_loader
    from photoz_hpc.config import ROOTS, load_config
    from photoz_hpc.data import open_dataset
    from photoz_hpc.train.runtime import set_cpu_threads

    cfg = load_config(args.config, args.overrides, ROOTS["finetune" if args.pipeline == "finetune" else "pretrain"])
    threads = set_cpu_threads(cfg, torch.device("cpu"))
    ds = open_dataset(args.data)
    ids = np.load(args.ids, allow_pickle=False) if args.ids else None
    x = torch.randn(256, 256)

    def compute() -> None:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < args.compute_ms / 1e3:
            x @ x

    real = build_loader(cfg, ds, args.pipeline, ids=ids)
    results = {"real": measure(real, args.epochs, compute)}
    first = real.source.batch(0)
    if hasattr(real, "close"):
        real.close()  # its pipeline's threads stay out of the second measurement
    original = source_mod.BatchSource.batch
    source_mod.BatchSource.batch = lambda self, k: first  # every position: the same, already built batch
    try:
        results["same-batch"] = measure(build_loader(cfg, ds, args.pipeline, ids=ids), args.epochs, compute)
    finally:
        source_mod.BatchSource.batch = original
    results["host_work_ms"] = results["real"]["steady_ms"] - results["same-batch"]["steady_ms"]
    step = args.compute_ms + results["real"]["steady_ms"]
    print(f"{args.pipeline}, batch {cfg.loader.batch_size}, {cfg.loader.backend} loader, {cfg.loader.num_threads} loader "
          f"threads, {threads} intra-op thread(s), {args.compute_ms:g} ms of compute per step")
    for name in ("real", "same-batch"):
        r = results[name]
        print(f"  {name:10s} wait per step {r['steady_ms']:.2f} ms (median {r['steady_median_ms']:.2f}), "
              f"first step of an epoch {r['epoch_start_ms']:.2f} ms")
    print(f"  host work per batch in the training thread: {results['host_work_ms']:.2f} ms; "
          f"data-wait fraction at this step {100 * results['real']['steady_ms'] / step:.1f}%")
    info = {"benchmark": "loader_wait", "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus", "load_avg": os.getloadavg(),
            "pipeline": args.pipeline, "batch_size": cfg.loader.batch_size, "compute_ms": args.compute_ms,
            "intra_op_threads": threads, "loader_threads": cfg.loader.num_threads, **results}
    if args.json:
        args.json.write_text(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
