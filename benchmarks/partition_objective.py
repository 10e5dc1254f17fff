"""What node partitions do to the objective: the demo pretraining on 2 nodes of 1 rank, ``data.partition``
global vs node, then the demo fine-tuning of each encoder (same labels, same seed) and its validation sigma_MAD.

  python benchmarks/partition_objective.py [--out runs/partition_objective] [--epochs 24]
      [--samples-per-shard 64] [--seeds 0] [--json OUT.json]

With node partitions each node's batches come from its own half of the survey (so do its shuffle-BN
statistics); the MoCo queue still mixes keys of both nodes, so negatives come from the whole survey. The two
ranks are launched like ``torchrun --nnodes 2 --nproc-per-node 1`` on one host (RANK/WORLD_SIZE, local size 1,
``dist.backend=torch``). Everything else is configs/demo.yaml and configs/demo_finetune.yaml. The quickstart
survey (4096 galaxies) is prepared with small shards (``--samples-per-shard``, default 64: 64 shards, 32 per
node), so the deal mixes the sky finely.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from photoz_hpc.config import FinetuneRunConfig, load_config, packaged_config  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pretrain_two_nodes(data: Path, out: Path, partition: str, epochs: int, seed: int) -> dict:
    """The demo pretraining as 2 processes, each its own node; returns rank 0's summary.json."""
    if (out / "summary.json").is_file():
        summary = json.loads((out / "summary.json").read_text())
        if not summary.get("preempted"):
            return summary
    port = free_port()
    cmd = [sys.executable, "-m", "photoz_hpc", "pretrain", "--config", packaged_config("demo.yaml"),
           f"data.path={data}", f"out_dir={out}", f"data.partition={partition}", f"train.epochs={epochs}",
           f"seed={seed}", "dist.backend=torch", "loader.num_threads=1", "train.progress=false"]
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate()[0] for p in procs]
    for rank, (p, text) in enumerate(zip(procs, outputs, strict=True)):
        if p.returncode != 0:
            raise SystemExit(f"pretraining ({partition}) rank {rank} failed:\n{text[-3000:]}")
    return json.loads((out / "summary.json").read_text())


def finetune(data: Path, encoder: Path, out: Path, seed: int) -> dict:
    from photoz_hpc.launch.finetune_eval import finetune_and_evaluate

    cfg = load_config(packaged_config("demo_finetune.yaml"),
                      [f"data.path={data}", f"out_dir={out}", f"finetune.init={encoder}", f"seed={seed}",
                       "train.progress=false", "dist.backend=none"], root=FinetuneRunConfig)
    return finetune_and_evaluate(cfg)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/partition_objective")
    ap.add_argument("--epochs", type=int, default=24)
    ap.add_argument("--samples-per-shard", type=int, default=64)
    ap.add_argument("--seeds", default="0", help="comma-separated pretraining/fine-tuning seeds")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from photoz_hpc.launch.quickstart import build_dataset

    out = Path(args.out)
    pre_cfg = load_config(packaged_config("demo.yaml"), [f"data.path={out / 'data'}",
                                                         f"data.samples_per_shard={args.samples_per_shard}"])
    data = build_dataset(pre_cfg)
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for partition in ("global", "node"):
            t0 = time.perf_counter()
            run = out / f"seed{seed}" / partition
            pre = pretrain_two_nodes(data, run / "pretrain", partition, args.epochs, seed)
            ft = finetune(data, run / "pretrain" / "encoder.pt", run / "finetune", seed)
            metrics = ft["eval"]["metrics"]
            reads = pre.get("reads") or {}
            rows.append({"seed": seed, "partition": partition, "steps": pre["steps"], "first_loss": pre["first_loss"],
                         "last_loss": pre["last_loss"], "sigma_mad": metrics["sigma_mad"], "eta": metrics["eta"],
                         "bias": metrics["bias"], "n_val": ft["n_val"],
                         "shards_per_rank": [r["shard_files"] for r in reads.get("per_rank", [])],
                         "minutes": round((time.perf_counter() - t0) / 60, 1)})
            print(json.dumps(rows[-1]), flush=True)
    print("\n| seed | partition | MoCo steps | loss first -> last | shard files read per rank | fine-tuned sigma_MAD | "
          "eta | bias |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['partition']} | {r['steps']} | {r['first_loss']:.3f} -> {r['last_loss']:.3f} | "
              f"{r['shards_per_rank']} | {r['sigma_mad']:.4f} | {100 * r['eta']:.2f}% | {r['bias']:+.4f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
