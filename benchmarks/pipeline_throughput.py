"""Throughput of the augmentation loaders: DALI (CPU, and GPU when present) against the reference.

Usage: python benchmarks/pipeline_throughput.py [--data DIR] [--n 4096] [--batch-size 256]
       [--threads 2] [--batches 12] [--pipeline pretrain] [--json out.json]
       python benchmarks/pipeline_throughput.py --store-only --work DIR --n 8192   (the GPU check's store step)

Without ``--data`` it writes a synthetic store (random 107x107x5 cutouts via ``prepare``) under
``--work``. Each loader runs through the public ``build_loader`` API; the first ``--warmup``
batches (pipeline build, page cache, noise table) are excluded. Prints samples/s, samples/s per
core (``--threads`` cores: DALI's thread pool and torch's intra-op threads are both set to it) and
the DALI/reference ratio. "Samples" are dataset samples: a pretrain sample is two views. Records
are CRC-checked once per process before timing (steady state); ``--cold`` times that first read too.
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


def make_store(work: Path, n: int, size: int = 107) -> Path:
    import shutil

    import h5py

    from photoz_hpc.constants import R_DR12
    from photoz_hpc.data.prepare import prepare

    out = work / f"bench-{n}-{size}"
    if (out / "manifest.json").exists():
        return out
    work.mkdir(parents=True, exist_ok=True)
    # A build killed midway leaves OUT.partial planned for the HDF5 it wrote then; the HDF5 is written anew
    # below (another file to prepare's plan), so that staging could never be resumed and would fail every rerun.
    shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)
    rng = np.random.default_rng(0)
    h5 = work / f"bench-{n}-{size}.h5"
    with h5py.File(h5, "w") as fh:
        images = fh.create_dataset("images", (n, 5, size, size), dtype="f4")
        for s in range(0, n, 512):
            m = min(512, n - s)
            images[s : s + m] = (rng.standard_normal((m, 5, size, size), dtype=np.float32) * 0.01 + 0.05)
        ebv = rng.lognormal(np.log(0.03), 0.5, n)
        fh["e_bv"] = (R_DR12[None, :] * ebv[:, None]).astype(np.float32)
        fh["ra"], fh["dec"] = rng.uniform(120, 240, n), rng.uniform(0, 60, n)
        fh["ObjID"] = np.arange(n, dtype=np.int64) + 1237650000000000000
        fh["specObjID"] = np.arange(n, dtype=np.int64) + 300000000000000000
        fh["specz_redshift"] = rng.uniform(0.01, 0.35, n).astype(np.float32)
        fh["specz_redshift_err"] = np.full(n, 1e-4, np.float32)
    prepare([h5], out, samples_per_shard=1024)
    h5.unlink()
    return out


def measure(loader, batches: int, warmup: int) -> float:
    """Samples/s over ``batches`` batches after ``warmup`` (epochs roll over as in training)."""
    done, epoch, t0, counted = 0, 0, None, 0
    while counted < batches:
        loader.set_epoch(epoch)
        for batch in loader:
            first = next(iter(batch.values()))
            if first.is_cuda:
                import torch

                torch.cuda.synchronize()
            done += 1
            if done == warmup:
                t0 = time.perf_counter()
            elif done > warmup:
                counted += len(first)
                if counted >= batches * len(first):
                    break
        epoch += 1
    return counted / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path)
    ap.add_argument("--work", type=Path, default=Path("/tmp/photoz-bench"))
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    from photoz_hpc.augment.pipelines import PIPELINES

    ap.add_argument("--pipeline", default="pretrain", choices=list(PIPELINES))
    ap.add_argument("--devices", default="auto", help="cpu, gpu, or auto (cpu plus gpu when present)")
    ap.add_argument("--cold", action="store_true", help="include the first-read CRC check of every record (epoch 0)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--store-only", action="store_true", help="build (or reuse) the --work store, print its path, exit")
    args = ap.parse_args(argv)
    if args.store_only:
        print(make_store(args.work, args.n))
        return 0

    import torch

    from photoz_hpc.augment.loaders import build_loader, dali_available
    from photoz_hpc.config import load_config
    from photoz_hpc.data import open_dataset

    torch.set_num_threads(args.threads)
    data = args.data or make_store(args.work, args.n)
    ds = open_dataset(data)
    if not args.cold:  # steady state (epochs >= 1): every record already CRC-checked once by this process
        from photoz_hpc.augment.source import RecordReader

        RecordReader(ds).records(np.arange(len(ds)))
    devices = ["cpu", "gpu"] if args.devices == "auto" and torch.cuda.is_available() else [args.devices if args.devices != "auto" else "cpu"]
    overrides = [f"loader.batch_size={args.batch_size}", f"loader.num_threads={args.threads}"]
    runs = []
    for device in devices:
        cores = args.threads if device == "cpu" else 1
        variants = [("reference", 0)] + ([("reference", 1)] if device == "cpu" else [])
        variants += [("dali", 0)] if dali_available() else []
        for backend, workers in variants:
            cfg = load_config(None, overrides + [f"loader.backend={backend}", f"loader.num_workers={workers}"])
            loader = build_loader(cfg, ds, args.pipeline, device=device)
            rate = measure(loader, args.batches, args.warmup)
            name = f"{backend}-{device}" + (f"-workers{workers}" if backend == "reference" else "")
            runs.append({"name": name, "backend": backend, "device": device, "samples_per_s": rate, "per_core": rate / cores})
            print(f"{name:28s} {rate:10.0f} samples/s  {rate / cores:9.0f} samples/s per {'core' if device == 'cpu' else 'GPU'}", flush=True)
    for device in devices:
        ref = max((r for r in runs if r["device"] == device and r["backend"] == "reference"), key=lambda r: r["samples_per_s"])
        for r in runs:
            if r["device"] == device and r["backend"] == "dali":
                print(f"ratio {r['name']} / best reference ({ref['name']}): {r['samples_per_s'] / ref['samples_per_s']:.2f}")
    info = {
        "pipeline": args.pipeline, "cold": args.cold, "command": " ".join(sys.argv), "batch_size": args.batch_size, "threads": args.threads, "n": len(ds),
        "image_shape": ds.manifest["image_shape"], "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "runs": runs,
        "date": time.strftime("%Y-%m-%d"),
    }
    if args.json:
        args.json.write_text(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
