"""MoCo pretraining throughput, per rank and in total, with the step breakdown, FLOPs and MFU.

Usage (any launcher photoz_hpc reads: one process, torchrun, horovodrun, srun):
  python benchmarks/train_throughput.py --config configs/demo.yaml --data DIR [--modes synthetic,end2end,pipeline]
      [--warmup 5] [--windows 5] [--window-steps 10] [--peak NAME | --peak-tflops X] [--json OUT] [key=value ...]

Modes: ``synthetic`` = compute only (two fixed in-memory batches on the device, no loader); ``end2end`` = the
real loader feeding the trainer (``loader.*`` as configured), epochs rolling over as in ``train.loop``;
``pipeline`` = the loader alone. Each mode runs ``--warmup`` steps, then ``--windows`` timed windows of
``--window-steps`` steps; images/s is the mean over windows with a 95% interval (Student t).

Step breakdown (seconds per step, exclusive): data wait (CUDA: the GPU's idle time while the host waits for the
loader, from events around the wait, as in ``train.loop``; a CPU: host time blocked in the loader), forward (query and
key encoders, loss), momentum update, queue (scoring against the queue and the enqueue), communication
(explicit collectives: shuffle-BN gathers, the sharded queue's reductions, the per-step metric all-reduce; DDP's
gradient all-reduce overlaps the backward and is counted there, Horovod's is in ``optimizer``, whose
``step`` waits for it), backward, optimizer, other. Regions are timed around the Trainer's parts (wrapped on
this instance only) and marked with ``torch.profiler.record_function``; on CUDA with events, read once per
window, so the step is never synchronised; on a CPU the host clock is exact.

FLOPs per image: one training step's forward + backward under ``torch.utils.flop_counter.FlopCounterMode``
(query encoder forward + backward, key encoder forward, loss), divided by the per-rank batch. MFU = FLOPs per
image x images/s per device / peak (dense bf16, ``PEAK_TFLOPS``; a CPU gets a nominal fp32 peak from its core
count, clock and vector width, marked as such).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: Dense bf16 tensor-core peaks, TFLOP/s, by a substring of ``torch.cuda.get_device_name()`` (first match).
PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "GH200": 989.0,
               "A100": 312.0, "L40S": 362.0, "A10G": 70.0}
REGIONS = ["data", "forward", "momentum", "queue", "comm", "backward", "optimizer"]


def t_interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% interval of the mean) of ``values`` (Student t; 0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    from scipy.stats import t

    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(t.ppf(0.975, n - 1)) * sd / math.sqrt(n)


class Regions:
    """Nested timed regions; exclusive seconds per name. CUDA: event pairs, resolved by ``collect``."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.open: list[list] = []  # [name, start, children (list of records)]
        self.records: list[list] = []  # top-level [name, start, end, children]
        self.enabled = True

    def _now(self):
        if self.cuda:
            import torch

            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    @contextlib.contextmanager
    def region(self, name: str):
        if not self.enabled:
            yield
            return
        import torch

        rec = [name, self._now(), None, []]
        (self.open[-1][3] if self.open else self.records).append(rec)
        self.open.append(rec)
        try:
            with torch.profiler.record_function(f"photoz.{name}"):
                yield
        finally:
            self.open.pop()
            rec[2] = self._now()

    def collect(self) -> dict[str, float]:
        """Exclusive seconds per region name since the last call (synchronises on CUDA)."""
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        out = dict.fromkeys(REGIONS, 0.0)

        def span(rec) -> float:
            a, b = rec[1], rec[2]
            if isinstance(a, float):
                return b - a
            return a.elapsed_time(b) / 1e3

        def walk(rec) -> float:
            total = span(rec)
            out[rec[0]] = out.get(rec[0], 0.0) + total - sum(walk(c) for c in rec[3])
            return total

        for rec in self.records:
            walk(rec)
        self.records = []
        return out


def instrument(trainer, regions: Regions):
    """Wrap this trainer's parts in timed regions (instance attributes, and the module-level
    ``backward_and_step`` that ``Trainer.train_step`` calls); returns the function that undoes it."""
    import photoz_hpc.train.pretrain as pretrain_mod

    undo = []

    def wrap(obj, attr: str, name: str) -> None:
        fn = getattr(obj, attr)
        undo.append((obj, attr, attr in vars(obj), fn))

        def timed(*a, **kw):
            with regions.region(name):
                return fn(*a, **kw)

        setattr(obj, attr, timed)

    model, comm = trainer.model, trainer.comm
    wrap(model, "momentum_update", "momentum")
    wrap(model, "contrastive_loss", "queue")
    wrap(model, "dequeue_and_enqueue", "queue")
    wrap(trainer.net, "forward", "forward")
    for attr in ("allreduce", "allgather"):
        wrap(comm, attr, "comm")
    wrap(trainer.optimizer, "step", "optimizer")
    inner = pretrain_mod.backward_and_step

    def backward_and_step(*a, **kw):
        with regions.region("backward"):
            return inner(*a, **kw)

    pretrain_mod.backward_and_step = backward_and_step  # the name Trainer.train_step calls

    def restore() -> None:
        pretrain_mod.backward_and_step = inner
        for obj, attr, own, fn in reversed(undo):
            if own:
                setattr(obj, attr, fn)
            else:
                delattr(obj, attr)

    return restore


def flops_per_image(cfg, device, precision, survey) -> float:
    """Model FLOPs of one MoCo training step per image (forward + backward), on a one-process copy."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from photoz_hpc.models.moco import build_moco

    torch.manual_seed(0)
    model = build_moco(cfg, None, survey=survey).to(device)
    b, s = cfg.loader.batch_size, cfg.augment.crop_size
    x = torch.randn(b, survey.n_bands, s, s, device=device)
    with FlopCounterMode(display=False) as counter:
        with precision.autocast():
            out = model(x, x.flip(-1), momentum=0.99, shuffle_seed=0)
        out["loss"].backward()
    return counter.get_total_flops() / b


def cpu_peak_tflops() -> tuple[float | None, str]:
    """A nominal fp32 peak of this CPU: cores x clock x FLOP/cycle (2 FMA units x vector lanes x 2)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None, "unknown"
    flags = next((ln for ln in info.splitlines() if ln.startswith("flags")), "")
    mhz = [float(ln.split(":")[1]) for ln in info.splitlines() if ln.startswith("cpu MHz")]
    lanes = 16 if " avx512f" in flags else 8 if " avx2" in flags else 4
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if not mhz:
        return None, "unknown"
    peak = cores * (sum(mhz) / len(mhz)) * 1e6 * 2 * lanes * 2 / 1e12
    return peak, f"nominal fp32: {cores} cores x {sum(mhz) / len(mhz):.0f} MHz x {4 * lanes} FLOP/cycle"


def device_peak(device, args) -> tuple[float | None, str]:
    import torch

    if args.peak_tflops:
        return args.peak_tflops, "given (--peak-tflops)"
    if device.type == "cuda":
        name = args.peak or torch.cuda.get_device_name(device)
        for key, tf in PEAK_TFLOPS.items():
            if key in name:
                return tf, f"{key} dense bf16"
        return None, f"no peak known for {name}"
    return cpu_peak_tflops()


def _loader_epochs(loader):
    """Batches forever, epoch after epoch as ``train.loop`` asks for them: (batch, first of its epoch)."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        first = True
        for batch in loader:
            yield batch, first
            first = False
        epoch += 1


def run_mode(mode: str, cfg, comm, device, args, survey, loader=None) -> dict[str, Any]:
    """One mode: warm-up, timed windows; images/s per rank and in total, breakdown, data wait."""
    import torch

    from photoz_hpc.train.pretrain import Trainer

    cuda = device.type == "cuda"
    regions = Regions(cuda)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    gb = cfg.loader.batch_size * comm.world
    trainer, restore = None, (lambda: None)
    if mode != "pipeline":
        trainer = Trainer(cfg, comm, device, steps_per_epoch=max(1, len(loader)) if loader is not None else 1000,
                          survey=survey)
        if args.breakdown:
            restore = instrument(trainer, regions)
    try:
        return _timed_windows(mode, cfg, comm, args, loader, trainer, regions, sync, gb, survey.n_bands)
    finally:
        restore()


def _timed_windows(mode, cfg, comm, args, loader, trainer, regions, sync, gb, bands) -> dict[str, Any]:
    import torch

    from photoz_hpc.train.late_reads import DataWait, LateRead

    device = trainer.device if trainer is not None else None
    if mode == "synthetic":
        b, s = cfg.loader.batch_size, cfg.augment.crop_size
        gen = torch.Generator(device="cpu").manual_seed(comm.rank)
        fixed = [{"view1": torch.randn(b, bands, s, s, generator=gen).to(device),
                  "view2": torch.randn(b, bands, s, s, generator=gen).to(device)} for _ in range(2)]
        stream = ((batch, False) for batch in itertools.cycle(fixed))
    else:
        stream = _loader_epochs(loader)
    pending = None
    first_waits, windows, parts, waits = [], [], [], []

    def step(record: bool) -> None:
        nonlocal pending
        wait = DataWait(device if device is not None else torch.device("cpu"))  # GPU: events, read after the window
        batch, first = next(stream)
        if record:
            waits.append((wait.stop(), first))
        if trainer is None:
            return
        res = trainer.train_batch(batch)
        local = torch.stack([res["loss"].detach().reshape(()).double(), res["metrics"]["acc"].reshape(()).double()])
        reduced = LateRead(comm.allreduce(local, "sum"))  # the loop's one metric all-reduce per step (timed as comm)
        if pending is not None:
            pending.tolist()  # read one step late after its own copy's event, as train.loop does
        pending = reduced

    regions.enabled = False
    for _ in range(args.warmup):
        step(False)
    regions.enabled = args.breakdown
    for _ in range(args.windows):
        sync()
        regions.collect()
        t0 = time.perf_counter()
        for _ in range(args.window_steps):
            step(True)
        if pending is not None:
            pending.tolist()
        sync()
        dt = time.perf_counter() - t0
        windows.append(dt / args.window_steps)
        part = regions.collect()
        part["data"] = sum(w.seconds() for w, _ in waits)  # the window's events are complete now
        first_waits.extend(w.seconds() for w, first in waits if first)
        waits.clear()
        parts.append(part)
    per_step = windows
    rates = [gb / w for w in per_step]
    mean, half = t_interval(rates)
    step_s = sum(per_step) / len(per_step)
    breakdown = {k: sum(p[k] for p in parts) / (len(parts) * args.window_steps) for k in REGIONS}
    breakdown["other"] = max(0.0, step_s - sum(breakdown.values()))
    data_wait = breakdown["data"] / step_s
    out = {"mode": mode, "world_size": comm.world, "backend": comm.name, "batch_per_rank": cfg.loader.batch_size,
           "global_batch": gb, "img_per_s": mean, "img_per_s_ci95": half, "img_per_s_per_rank": mean / comm.world,
           "img_per_s_windows": rates, "step_s": step_s, "breakdown_s": breakdown if args.breakdown else None,
           "data_wait_frac": data_wait if trainer is not None else None,
           "epoch_start_data_wait_s": (sum(first_waits) / len(first_waits)) if first_waits else None,
           "epoch_starts_timed": len(first_waits)}
    if mode == "pipeline":
        out["samples_per_s"], out["samples_per_s_per_rank"] = mean, mean / comm.world
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None)
    ap.add_argument("--data", default=None, help="prepared store (data.path); needed by end2end and pipeline")
    ap.add_argument("--modes", default="synthetic,end2end,pipeline")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--windows", type=int, default=5)
    ap.add_argument("--window-steps", type=int, default=10)
    ap.add_argument("--no-breakdown", dest="breakdown", action="store_false", help="time whole steps only")
    ap.add_argument("--rebuild-each-epoch", action="store_true",
                    help="DALI: a new pipeline at every epoch (the behaviour before one pipeline served the run)")
    ap.add_argument("--peak", default=None, help="device name for the peak table (default: the device's)")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("overrides", nargs="*", help="config key=value")
    args = ap.parse_args(argv)

    import torch

    from photoz_hpc.config import load_config
    from photoz_hpc.train.runtime import data_ranks_per_node, run_with_comm
    from photoz_hpc.train.surveys import loader_survey, resolve_run_config

    overrides = list(args.overrides) + ([f"data.path={args.data}"] if args.data else [])
    overrides += ["train.progress=false", "train.tensorboard=false"]
    cfg = load_config(args.config, overrides)
    survey = loader_survey(None, cfg)  # the data's (synthetic mode without data: SDSS)
    cfg = resolve_run_config(cfg, survey)  # concrete crop and jitter
    modes = [m for m in args.modes.split(",") if m]
    load_before = os.getloadavg()

    def body(cfg, comm, device, flag):
        from photoz_hpc.train.precision import resolve_precision

        results, loader = [], None
        if any(m != "synthetic" for m in modes):
            from photoz_hpc.augment.loaders import build_loader

            loader = build_loader(cfg, cfg.data.path, "pretrain", rank=comm.rank, world_size=comm.world, seed=cfg.seed,
                                  ranks_per_node=data_ranks_per_node(cfg, comm))
            if args.rebuild_each_epoch and hasattr(loader, "persistent"):
                loader.persistent = False
        for mode in modes:
            results.append(run_mode(mode, cfg, comm, device, args, survey, None if mode == "synthetic" else loader))
        precision = resolve_precision(cfg.train.precision, device)
        flops = flops_per_image(cfg, device, precision, survey) if comm.rank == 0 else None
        peak, peak_note = device_peak(device, args)
        for r in results:
            if r["mode"] != "pipeline" and flops:
                r["tflops_per_device"] = flops * r["img_per_s_per_rank"] / 1e12
                r["mfu"] = r["tflops_per_device"] / peak if peak else None
        return {"results": results, "flops_per_image": flops, "peak_tflops": peak, "peak_note": peak_note,
                "precision": precision.name, "device": str(device),
                "loader": None if loader is None else {"backend": loader.backend, "device": loader.device,
                                                       "builds": getattr(loader, "builds", None)},
                "rank": comm.rank}

    info = run_with_comm(cfg, None, body)
    if info["rank"] != 0:
        return 0
    import numpy

    summary = {
        "benchmark": "train_throughput", "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "config": args.config, "overrides": overrides,
        "model": f"{cfg.model.arch}/{cfg.model.width}", "crop": cfg.augment.crop_size, "survey": survey.name,
        "bands": list(survey.bands), "queue": cfg.moco.queue_size,
        "embed": cfg.model.embed_dim,
        "bn_mode": cfg.moco.bn_mode, "queue_mode": cfg.moco.queue_mode,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
                     "dali": _version("nvidia.dali"), "horovod": _version("horovod")},
        "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
        "warmup": args.warmup, "windows": args.windows, "window_steps": args.window_steps, **info,
    }
    summary.pop("rank")
    for r in summary["results"]:
        bd = r["breakdown_s"]
        parts = "" if not bd else " | " + " ".join(f"{k} {1e3 * v:.1f}" for k, v in bd.items() if v > 0) + " ms"
        mfu = f", MFU {100 * r['mfu']:.2f}%" if r.get("mfu") else ""
        wait = f", data wait {100 * r['data_wait_frac']:.1f}%" if r["data_wait_frac"] is not None else ""
        first = (f", epoch-start wait {1e3 * r['epoch_start_data_wait_s']:.1f} ms ({r['epoch_starts_timed']})"
                 if r["epoch_start_data_wait_s"] is not None else "")
        unit = "samples/s" if r["mode"] == "pipeline" else "img/s"
        print(f"{r['mode']:9s} {r['world_size']} x {r['batch_per_rank']}: {r['img_per_s']:8.1f} +- "
              f"{r['img_per_s_ci95']:.1f} {unit} ({r['img_per_s_per_rank']:.1f}/rank), step {1e3 * r['step_s']:.1f} ms"
              f"{wait}{first}{mfu}{parts}")
    if summary["flops_per_image"]:
        print(f"FLOPs per image {summary['flops_per_image'] / 1e9:.3f} G (fwd+bwd); peak {summary['peak_tflops']} "
              f"TFLOP/s ({summary['peak_note']})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=1))
    return 0


def _version(mod: str) -> str | None:
    try:
        return __import__(mod, fromlist=["__version__"]).__version__
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
