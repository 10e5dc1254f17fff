"""Throughput of the augmentation loaders: DALI (CPU, and GPU when present) against the reference.

Usage: python benchmarks/pipeline_throughput.py [--data DIR] [--survey sdss] [--n 4096] [--batch-size 256]
       [--threads 2] [--batches 12] [--pipeline pretrain] [--json out.json] [key=value ...]
       python benchmarks/pipeline_throughput.py --store-only --work DIR --n 8192   (the GPU check's store step)

Without ``--data`` it writes a synthetic store of ``--survey`` (default sdss: random 107x107x5 cutouts; another
preset or survey file: its native cutout size and default bands, e.g. hsc 160x160x5) via ``prepare`` under
``--work``. The crop and jitter are the store's survey's defaults unless overridden (``augment.crop_size=N``).
Each loader runs through the public ``build_loader`` API; the first ``--warmup`` batches (pipeline build, page
cache, noise table) are excluded. Prints samples/s, samples/s per core (``--threads`` cores: DALI's thread pool
and torch's intra-op threads are both set to it), MB/s of records read and of views delivered, and the
DALI/reference ratio. "Samples" are dataset samples: a pretrain sample is two views. Records are CRC-checked once
per process before timing (steady state); ``--cold`` times that first read too.
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


def make_store(work: Path, n: int, size: int | None = None, survey: str = "sdss") -> Path:
    """A synthetic store of ``n`` cutouts of ``survey`` (a preset name or a survey file), ``size`` pixels (default:
    the survey's native cutout) in the survey's default bands, under ``work`` (reused when already there). SDSS:
    ``work/bench-N-107``, byte for byte the store of the SDSS-only benchmark; others ``work/bench-NAME-N-SIZE``."""
    import shutil

    import h5py

    from photoz_hpc.data.inputs import PrepareOptions
    from photoz_hpc.data.prepare import prepare
    from photoz_hpc.survey import load_survey

    desc = load_survey(survey)
    size = desc.cutout_size if size is None else size
    sdss = survey == "sdss"
    out = work / (f"bench-{n}-{size}" if sdss else f"bench-{desc.name}-{n}-{size}")
    if (out / "manifest.json").exists():
        return out
    work.mkdir(parents=True, exist_ok=True)
    # A build killed midway leaves OUT.partial planned for the HDF5 it wrote then; the HDF5 is written anew
    # below (another file to prepare's plan), so that staging could never be resumed and would fail every rerun.
    shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)
    rng = np.random.default_rng(0)
    h5 = out.with_name(out.name + ".h5")
    bands = desc.n_bands  # a release-layout file holds every band of the survey; prepare keeps the default ones
    with h5py.File(h5, "w") as fh:
        images = fh.create_dataset("images", (n, bands, size, size), dtype="f4")
        for s in range(0, n, 512):
            m = min(512, n - s)
            images[s : s + m] = (rng.standard_normal((m, bands, size, size), dtype=np.float32) * 0.01 + 0.05)
        ebv = rng.lognormal(np.log(0.03), 0.5, n)
        fh["e_bv"] = (np.asarray(desc.input_coefficients)[None, :] * ebv[:, None]).astype(np.float32)
        fh["ra"], fh["dec"] = rng.uniform(120, 240, n), rng.uniform(0, 60, n)
        fh["ObjID"] = np.arange(n, dtype=np.int64) + 1237650000000000000
        fh["specObjID"] = np.arange(n, dtype=np.int64) + 300000000000000000
        fh["specz_redshift"] = rng.uniform(0.01, 0.35, n).astype(np.float32)
        fh["specz_redshift_err"] = np.full(n, 1e-4, np.float32)
    options = None if sdss else PrepareOptions(survey=survey, bands=tuple(desc.spec.default_bands) or None)
    prepare([h5], out, samples_per_shard=1024, options=options)
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
    ap.add_argument("--survey", default="sdss",
                    help="survey of the synthetic store without --data: sdss (default), legacy, hsc, lsst or a survey "
                         "YAML file; native cutout size, default bands, the survey's default crop and jitter")
    ap.add_argument("overrides", nargs="*", help="config key=value for every loader (e.g. augment.crop_size=32)")
    args = ap.parse_args(argv)
    if args.store_only:
        print(make_store(args.work, args.n, survey=args.survey))
        return 0

    import torch

    from photoz_hpc.augment.loaders import build_loader, dali_available
    from photoz_hpc.config import load_config
    from photoz_hpc.data import open_dataset

    torch.set_num_threads(args.threads)
    data = args.data or make_store(args.work, args.n, survey=args.survey)
    ds = open_dataset(data)
    if not args.cold:  # steady state (epochs >= 1): every record already CRC-checked once by this process
        from photoz_hpc.augment.source import RecordReader

        RecordReader(ds).records(np.arange(len(ds)))
    devices = ["cpu", "gpu"] if args.devices == "auto" and torch.cuda.is_available() else [args.devices if args.devices != "auto" else "cpu"]
    overrides = [f"loader.batch_size={args.batch_size}", f"loader.num_threads={args.threads}", *args.overrides]
    runs = []
    spec = None
    for device in devices:
        cores = args.threads if device == "cpu" else 1
        variants = [("reference", 0)] + ([("reference", 1)] if device == "cpu" else [])
        variants += [("dali", 0)] if dali_available() else []
        for backend, workers in variants:
            cfg = load_config(None, overrides + [f"loader.backend={backend}", f"loader.num_workers={workers}"])
            loader = build_loader(cfg, ds, args.pipeline, device=device)
            spec = loader.source.spec
            rate = measure(loader, args.batches, args.warmup)
            name = f"{backend}-{device}" + (f"-workers{workers}" if backend == "reference" else "")
            # MB/s (1e6 bytes): float32 records read, and float32 views delivered (every view of a sample)
            read_mb = rate * ds.record_bytes / 1e6
            out_mb = rate * spec.n_views * spec.bands * spec.crop * spec.crop * 4 / 1e6
            runs.append({"name": name, "backend": backend, "device": device, "samples_per_s": rate, "per_core": rate / cores,
                         "read_MB_per_s": read_mb, "views_MB_per_s": out_mb})
            print(f"{name:28s} {rate:10.0f} samples/s  {rate / cores:9.0f} samples/s per {'core' if device == 'cpu' else 'GPU'}"
                  f"  {read_mb:8.1f} MB/s read  {out_mb:8.1f} MB/s views", flush=True)
    for device in devices:
        ref = max((r for r in runs if r["device"] == device and r["backend"] == "reference"), key=lambda r: r["samples_per_s"])
        for r in runs:
            if r["device"] == device and r["backend"] == "dali":
                print(f"ratio {r['name']} / best reference ({ref['name']}): {r['samples_per_s'] / ref['samples_per_s']:.2f}")
    survey = spec.survey if spec is not None else None
    info = {
        "survey": survey.name if survey else None, "bands": list(survey.bands) if survey else None,
        "crop": spec.crop if spec else None, "jitter_max": spec.jitter_max if spec else None,
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
