"""Survey inference throughput: ``photoz-hpc predict`` end to end (loader, network, pdf summaries, Parquet
parts with checksums) per process, and what 1e9 galaxies would cost at the measured rate.

Usage: python benchmarks/predict_throughput.py [--models tiny,resnet50] [--n 1024] [--n-resnet50 128]
       [--threads 2] [--batch-size 64] [--tta 1] [--device auto|cpu|cuda] [--node-cores 128]
       [--gpus-per-node 4] [--pdf] [--repeats 3] [--json out.json]

A synthetic store of 107x107x5 cutouts (``pipeline_throughput.make_store``, one part per 1024) is predicted by freshly
initialised networks (the rate does not depend on the weights): ``tiny`` = the width-8 ResNet-18 of the
demo, ``resnet50`` = the paper's ResNet-50, both on 64x64 centre crops. ``predict`` rate = galaxies /
wall time of the ranks' part loop (loader + network + summaries + writing; start-up excluded; each
record read and CRC-checked once, as in a survey run), best of ``--repeats`` runs (a shared machine's
speed varies); ``network`` = forward passes alone on a fixed batch (best of 5); ``summaries`` =
``summarize_catalogue`` alone. On CPU the process uses ``--threads`` cores (torch
intra-op and DALI threads), so per core = rate / threads; node-hours assume ``--node-cores`` cores (CPU)
or ``--gpus-per-node`` GPUs (GPU) per node, scaling linearly (no communication: parts are independent).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

GALAXIES = 1e9
MODELS = {"tiny": ["model.arch=resnet18", "model.width=8"], "resnet50": ["model.arch=resnet50", "model.width=64"]}


def network_rate(net, device, batch: int, tta: int, autocast, repeats: int = 5) -> float:
    """Galaxies/s of the forward passes alone: the best of ``repeats`` batches after one warm-up batch."""
    import torch

    from photoz_hpc.train.inference import batch_log_probs

    x = torch.randn(batch, 5, 64, 64, device=device)
    batch_log_probs(net, x, tta, autocast)
    best = 0.0
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        batch_log_probs(net, x, tta, autocast)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, batch / (time.perf_counter() - t0))
    return best


def macs_per_galaxy(net, crop: int = 64) -> float:
    """Multiply-accumulates of one forward pass (every Conv2d and Linear), counted with forward hooks."""
    import torch

    total = [0]

    def hook(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            total[0] += output.numel() * k
        else:
            total[0] += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        net.cpu()(torch.zeros(1, 5, crop, crop))
    for h in handles:
        h.remove()
    return float(total[0])


def summary_rate(n: int = 20000) -> float:
    from photoz_hpc.evaluate.calibration import softmax_log
    from photoz_hpc.evaluate.pdfs import summarize_catalogue
    from photoz_hpc.survey import SDSS_GRID

    mu = np.random.default_rng(0).uniform(0.05, 0.35, n)
    probs = softmax_log(-0.5 * ((SDSS_GRID.centres()[None, :] - mu[:, None]) / 0.02) ** 2)
    t0 = time.perf_counter()
    summarize_catalogue(probs, SDSS_GRID)
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,resnet50")
    ap.add_argument("--work", type=Path, default=Path("/tmp/photoz-bench"))
    ap.add_argument("--n", type=int, default=1024, help="galaxies predicted by the tiny model")
    ap.add_argument("--n-resnet50", type=int, default=128, help="galaxies predicted by the ResNet-50")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--tta", type=int, default=1)
    ap.add_argument("--pdf", action="store_true", help="store the full pdfs too (bytes per galaxy)")
    ap.add_argument("--repeats", type=int, default=3, help="predict runs per model; the best rate is reported")
    ap.add_argument("--backend", default="auto", help="loader.backend: auto (DALI when installed) or reference")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--node-cores", type=int, default=128)
    ap.add_argument("--gpus-per-node", type=int, default=4)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    import torch
    from pipeline_throughput import make_store

    from photoz_hpc.config import FinetuneRunConfig, load_config
    from photoz_hpc.evaluate.catalogue import PredictOptions, run_predict
    from photoz_hpc.models.photoz_net import build_photoz_net, save_photoz_model
    from photoz_hpc.train.precision import resolve_precision

    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    gpu = device.type == "cuda"
    runs = []
    for name in args.models.split(","):
        n = args.n if name == "tiny" else args.n_resnet50
        data = make_store(args.work, n)
        overrides = [*MODELS[name], "augment.crop_size=64", f"loader.backend={args.backend}",
                     f"loader.num_threads={args.threads}", f"train.cpu_threads={args.threads}", "dist.backend=none"]
        cfg = load_config(None, overrides, root=FinetuneRunConfig)
        net = build_photoz_net(cfg.model).eval()
        gmacs = macs_per_galaxy(net) / 1e9
        rates = []
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = save_photoz_model(net, cfg.model, Path(tmp) / "model.pt", {"config": dataclasses.asdict(cfg)})
            for r in range(args.repeats):  # a fresh catalogue each time (a re-run would skip every part)
                report = run_predict(ckpt, [data], Path(tmp) / f"catalogue{r}",
                                     PredictOptions(batch_size=args.batch_size, tta=args.tta, with_pdf=args.pdf))
                rates.append(report["rate"])
            part_bytes = sum(f.stat().st_size for f in (Path(tmp) / "catalogue0" / "parts").iterdir())
        precision = resolve_precision("auto", device)
        net_rate = network_rate(net.to(device), device, args.batch_size, args.tta, precision.autocast)
        rate = max(rates)
        cores = 1 if gpu else args.threads
        per_node = args.gpus_per_node if gpu else args.node_cores
        hours_one = GALAXIES / rate / 3600
        run = {"model": name, "gmac_per_galaxy": gmacs, "n": n, "device": str(device), "precision": report["precision"], "tta": args.tta,
               "backend": args.backend, "pdf": args.pdf, "bytes_per_galaxy": part_bytes / n, "predict_per_s": rate, "predict_runs_per_s": rates, "per_core": rate / cores if not gpu else None,
               "per_gpu": rate if gpu else None, "network_per_s": net_rate, "hours_1e9_one_process": hours_one,
               "core_hours_1e9": None if gpu else GALAXIES / (rate / cores) / 3600,
               "gpu_hours_1e9": hours_one if gpu else None,
               "node_hours_1e9": GALAXIES / (rate / cores * per_node) / 3600, "node": f"{per_node} {'GPUs' if gpu else 'cores'}"}
        runs.append(run)
        unit = "GPU" if gpu else "core"
        print(f"{name:9s} ({gmacs:.2f} GMAC/galaxy) predict {rate:9.1f} gal/s ({rate / cores:8.1f} per {unit}), network alone {net_rate:9.1f} "
              f"gal/s; 1e9 galaxies: {hours_one:9.0f} h on one process, {run['node_hours_1e9']:9.0f} node-hours "
              f"({run['node']} per node); {part_bytes / n:.0f} bytes/galaxy", flush=True)
    srate = summary_rate()
    print(f"pdf summaries alone: {srate:.0f} galaxies/s (one thread of numpy)")
    info = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
            "gpu": torch.cuda.get_device_name() if gpu else None, "torch": torch.__version__, "threads": args.threads,
            "batch_size": args.batch_size, "summaries_per_s": srate, "runs": runs}
    if args.json:
        args.json.write_text(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
