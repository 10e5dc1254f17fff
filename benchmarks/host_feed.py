"""The host side that feeds the DALI pipeline: how many raw cutouts per second one Python thread (and a few)
can move, against what a GPU pipeline needs.

  python benchmarks/host_feed.py [--data DIR | --n 4096] [--batch-size 256] [--batches 16] [--threads 1,2]
      [--target 40000] [--json OUT] [key=value ...]

Stages, each timed alone on warm page cache (records CRC-checked once before): ``read`` = gathering a
batch's records from the memory-mapped shards into one dense buffer (what the GPU path's pinned staging
does: ``_Feeder._staged``); ``draws`` = ``BatchSource.batch(k)`` (the plan's ids, zero-copy record views,
every view's matrices, multipliers, sigmas and noise-table slices); ``padded`` = the CPU path's copy into
zero-bordered buffers (``_Feeder._padded``); ``h2d`` = pinned host -> device copy of the staged batch (CUDA
only). GB/s counts raw cutout bytes (H x W x C x 4 per sample; x 2 for a float16 store, whose records are
staged and copied as float16). ``--threads`` runs ``read`` in that many
threads on disjoint batches (NumPy copies release the GIL), the ceiling of moving reads into DALI's
parallel external source. The target: two-view samples/s x bytes per cutout (40,000 x 107 x 107 x 5 x 4 =
9.2 GB/s).

``feed_sync`` / ``feed_ahead``: the GPU path's host callback (``_Feeder.host``: draws + staged read) as DALI
calls it, once per batch, with ``--compute-ms`` of GIL-free waiting between calls (the training thread waiting
on the GPU step; 6 ms = a batch of 256 at 40,000 samples/s), either doing the host work in the calling thread
(``ahead`` = 0, the behaviour before) or taking batches prepared ``--ahead`` batches before in background
threads. ``thread_ms`` is the training thread's time inside the callback per batch (what a step waits for);
``samples_per_s`` the feed's rate including the waits. Without CUDA the staging buffers are pageable.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _rate(fn, batches: int, batch_size: int, sample_bytes: int, repeats: int = 3) -> dict:
    """Best of ``repeats`` passes of ``fn(k)`` over ``batches`` batches: samples/s and GB/s."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for k in range(batches):
            fn(k)
        best = min(best, time.perf_counter() - t0)
    sps = batches * batch_size / best
    return {"samples_per_s": sps, "gb_per_s": sps * sample_bytes / 1e9, "s_per_batch": best / batches}


def _feed(source, ahead: int, batches: int, batch_size: int, sample_bytes: int, compute_s: float, cuda: bool,
          warmup: int = 3) -> dict:
    """The GPU path's host callback over ``batches`` batches after ``warmup`` (see the module docstring)."""
    from types import SimpleNamespace

    from photoz_hpc.augment.dali_pipeline import EpochSources, _Feeder

    feeder = _Feeder(EpochSources(source, lambda e: e + 1), 0, "gpu", 0, ahead=ahead)
    if not cuda:
        feeder.alloc = lambda shape: np.empty(shape, feeder.record_dtype)
    inside = 0.0
    for i in range(warmup + batches):
        if i == warmup:
            inside, t0 = 0.0, time.perf_counter()
        t = time.perf_counter()
        feeder.host(SimpleNamespace(iteration=i))
        inside += time.perf_counter() - t
        feeder.pending.pop(i, None)  # the noise callbacks (GPU work) are not called here
        feeder.delivered_at.popleft()
        feeder.release(feeder.delivered.popleft()[1])
        time.sleep(compute_s)
    wall = time.perf_counter() - t0
    feeder.close()
    sps = batches * batch_size / wall
    return {"samples_per_s": sps, "gb_per_s": sps * sample_bytes / 1e9, "s_per_batch": wall / batches,
            "thread_ms": 1e3 * inside / batches, "ahead": ahead, "compute_ms": 1e3 * compute_s}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path)
    ap.add_argument("--work", type=Path, default=Path("/tmp/photoz-bench"))
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--batches", type=int, default=16)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--target", type=float, default=40000.0, help="two-view samples/s the GPU pipeline should get")
    ap.add_argument("--compute-ms", type=float, default=6.0, help="GIL-free wait between batches in feed_*")
    ap.add_argument("--ahead", type=int, default=2, help="batches prepared ahead in feed_ahead")
    ap.add_argument("--json", type=Path)
    ap.add_argument("overrides", nargs="*", help="config key=value (e.g. augment.crop_size=32)")
    args = ap.parse_args(argv)

    import torch
    from pipeline_throughput import make_store

    from photoz_hpc.augment.dali_pipeline import _Feeder
    from photoz_hpc.augment.loaders import build_loader
    from photoz_hpc.augment.source import RecordReader
    from photoz_hpc.config import load_config
    from photoz_hpc.data import open_dataset

    data = args.data or make_store(args.work, args.n)
    ds = open_dataset(data)
    RecordReader(ds).records(np.arange(len(ds)))  # CRC-check once: steady state
    cfg = load_config(None, [f"loader.batch_size={args.batch_size}", "loader.backend=reference", *args.overrides])
    source = build_loader(cfg, ds, "pretrain").source
    n_batches = min(args.batches, len(source))
    if n_batches < 1:
        raise SystemExit(f"the store holds fewer than {args.batch_size} samples")
    h, w, c = ds.image_shape
    sample_bytes = ds.record_bytes  # a float16 store's records are half a float32 store's
    batches = [source.batch(k) for k in range(n_batches)]
    cuda = torch.cuda.is_available()
    feeder = _Feeder(source, 0, "gpu" if cuda else "cpu")
    staged = np.empty((args.batch_size, h, w, c), ds.image_dtype)  # what the GPU path stages: the stored dtype
    results = {}

    def read(k, out=staged):
        for i, rec in enumerate(batches[k].images):
            out[i] = rec

    results["read"] = _rate(read, n_batches, args.batch_size, sample_bytes)
    results["draws"] = _rate(source.batch, n_batches, args.batch_size, sample_bytes)
    pad = _Feeder(source, 0, "cpu")

    def padded(k):
        buf = pad._padded(batches[k].images)
        pad._free.append((buf, None))

    results["padded"] = _rate(padded, n_batches, args.batch_size, sample_bytes)
    for t in [int(x) for x in args.threads.split(",") if x]:
        outs = [np.empty_like(staged) for _ in range(t)]
        with ThreadPoolExecutor(t) as pool:
            def par(k, pool=pool, outs=outs, t=t):
                if k % t == 0:
                    list(pool.map(lambda j: read((k + j) % n_batches, outs[j]), range(t)))

            r = _rate(par, n_batches - n_batches % t or t, args.batch_size, sample_bytes)
        results[f"read_threads{t}"] = r
    if cuda:
        stored = torch.from_numpy(staged[:0]).dtype
        pinned = torch.empty(staged.shape, dtype=stored, pin_memory=True)
        dev = torch.empty(staged.shape, dtype=stored, device="cuda")

        def h2d(k):
            dev.copy_(pinned, non_blocking=True)
            torch.cuda.synchronize()

        results["h2d"] = _rate(h2d, n_batches, args.batch_size, sample_bytes)
    del feeder
    for name, ahead in (("feed_sync", 0), ("feed_ahead", args.ahead)):
        results[name] = _feed(source, ahead, n_batches, args.batch_size, sample_bytes, args.compute_ms / 1e3, cuda)
    need = args.target * sample_bytes / 1e9
    # one thread does draws + read (+ padded on the CPU path) in series per batch
    serial = 1.0 / (results["draws"]["s_per_batch"] + results["read"]["s_per_batch"]) * args.batch_size
    print(f"{'stage':16s} {'samples/s':>10s} {'GB/s':>7s}  (raw cutouts {h}x{w}x{c} float32, {sample_bytes / 1e3:.0f} kB)")
    for name, r in results.items():
        extra = f"  training thread {r['thread_ms']:.2f} ms/batch" if "thread_ms" in r else ""
        print(f"{name:16s} {r['samples_per_s']:10.0f} {r['gb_per_s']:7.2f}{extra}")
    print(f"one thread, draws + staged read per batch: {serial:.0f} samples/s = {serial * sample_bytes / 1e9:.2f} GB/s; "
          f"target {args.target:.0f} samples/s needs {need:.2f} GB/s ({args.target / serial:.1f}x this)")
    info = {"benchmark": "host_feed", "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
            "gpu": torch.cuda.get_device_name() if cuda else None, "load_avg": os.getloadavg(),
            "batch_size": args.batch_size, "batches": n_batches, "sample_bytes": sample_bytes, "stages": results,
            "serial_samples_per_s": serial, "target_samples_per_s": args.target, "target_gb_per_s": need}
    if args.json:
        args.json.write_text(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
