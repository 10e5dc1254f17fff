"""An analytic model of MoCo pretraining scaling efficiency, per backend, BN mode and queue mode, with the data path.

  python benchmarks/scaling_model.py [--step-time S | --from THROUGHPUT.json] [--batch 256] [--arch resnet50]
      [--width 64] [--survey sdss] [--crop C] [--embed 128] [--network h100-4x200] [--gpus 8,16,...,1024]
      [--measured SCALING_DIR ...] [--json OUT] [--markdown OUT.md]
      [--site perlmutter-like,frontier-like [--site-file SITE.yaml] [--site-set KEY=VALUE ...]
       [--datasets sdss-paper,legacy-76m] [--dtypes float32,float16] [--io-only]]

Weak scaling (per-GPU batch B fixed): efficiency(N) = t1 / (t1 + exposed communication per step), t1 the
measured single-GPU step time (``--from`` a ``train_throughput.py`` JSON, or ``--step-time``; the default is
the goal, 256 images / 4,000 img/s = 64 ms, marked as not measured). Per step and rank:

* gradient all-reduce of the query encoder's fp32 gradients (4 P bytes), overlapped with the backward
  (``overlap`` x the backward's share of the step, 2/4 of MoCo's FLOPs), the rest exposed;
* shuffle-BN (``shuffle``): all-gather of the key images (B x bands x S x S x 4 bytes per rank, S the crop and
  bands those of ``--survey``: SDSS 5 x 64 x 64; every rank receives (N - 1) times that) and of the keys
  (B x d x 4), in the forward, not overlapped; grows with N.
  ``shuffle-node`` (the same ``moco.bn_mode``) shuffles within a node only (NVLink; the leak bound rises
  from 1/N to 1/g of keys normalised with their own query's batch, zero with a rank derangement); ``sync``
  all-reduces (sum, sum of squares) per BN layer in the query forward and backward and the key forward
  (latency-bound); ``none`` none;
* queue (``sharded``): all-gather of the queries (B x d x 4) and their gradients' all-reduce (N B d x 4) in
  the backward, two all-reduces of N B scalars forwards and one backwards; ``replicated``: all-gather of the
  keys; ``local``: none;
* metrics: one all-reduce of a few scalars.

Collectives are hierarchical: g GPUs per node on NVLink (``intra_gbs``), n = N / g nodes, the node's NICs
(``inter_gbs`` together) shared by its g GPUs; ring bandwidth terms, tree (log2) latency terms (``alpha``),
and Horovod's fusion cycle (half a ``cycle_ms`` per explicit collective on average). The limiting term is the
largest exposed one. Strong scaling (global batch G): the per-GPU step is t1 x (G / N) / B plus the same
communication at the smaller batch. ``--measured`` compares the model with every measured point of
``benchmarks/scaling.py`` (the network then is ``--measured-network``, by default this host's Gloo loopback).

The data path (``--site``; ``scaling_io.py`` has the model and the cited site figures): for each dataset,
``data.partition`` (global, node) and record dtype (float32, float16) the records a step reads come from node
memory, the node-local disk or the parallel file system. **Assumption: loaders prefetch, so reads overlap
compute**: the weak-scaling step is max(t1 + exposed communication, the node's reads per step), efficiency
t1 / step. Each row names its limiting term: ``compute`` (no other term over 1% of the step), a communication
term, ``fs-read``, ``local-read``, ``memory-read``, or ``does not fit`` (a node partition whose share fits neither
the node's memory nor its disk). Each dataset's rows use its survey's crop and bands for the communication.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # scaling.py (the measured points), scaling_io.py

from scaling_io import (  # noqa: E402
    DATASETS,
    ITEMSIZE,
    PARTITIONS,
    SITES,
    Dataset,
    Site,
    custom_site,
    data_path,
    dataset_survey,
    nodes_of,
    parse_dataset,
    record_bytes,
)


@dataclass(frozen=True)
class Network:
    name: str
    gpus_per_node: int
    intra_gbs: float  # per-GPU bus bandwidth within a node, GB/s
    inter_gbs: float  # a node's NICs together, GB/s
    alpha_intra_us: float
    alpha_inter_us: float
    note: str = ""


NETWORKS = {
    "h100-4x200": Network("h100-4x200", 8, 350.0, 100.0, 5.0, 12.0,
                          "8 x H100/H200 SXM per node, NVLink (~350 GB/s achievable bus bandwidth per GPU), "
                          "4 x 200 Gb/s InfiniBand per node (100 GB/s)"),
    "h100-8x400": Network("h100-8x400", 8, 350.0, 400.0, 5.0, 10.0,
                          "8 x H100 SXM per node, 8 x 400 Gb/s per node (a rail-optimised DGX fabric)"),
    # the site presets' networks (scaling_io.SITES): NIC figures cited there; intra-node bus bandwidths assumed
    "perlmutter-a100-4x200": Network("perlmutter-a100-4x200", 4, 200.0, 100.0, 5.0, 12.0,
                                     "4 x A100 per node on NVLink 3 (200 GB/s achievable bus bandwidth assumed, not "
                                     "verified), 4 x 200 Gb/s Slingshot 11 per node (100 GB/s; Lockwood et al. 2021)"),
    "frontier-mi250x-4x200": Network("frontier-mi250x-4x200", 8, 50.0, 100.0, 5.0, 12.0,
                                     "8 MI250X GCDs per node on Infinity Fabric (50-200 GB/s peak between GCDs per "
                                     "the OLCF guide; 50 GB/s taken), 4 x 25 GB/s Slingshot per node (100 GB/s)"),
    "cpu-gloo-loopback": Network("cpu-gloo-loopback", 64, 1.0, 1.0, 150.0, 150.0,
                                 "ranks of one CPU host over Gloo/TCP loopback (assumed 1 GB/s, 150 us per hop; "
                                 "not fitted)"),
}


@dataclass(frozen=True)
class Workload:
    step_s: float  # single-GPU step time at batch
    batch: int
    params: int  # query-encoder parameters (gradients all-reduced)
    bn_layers: int
    bn_channels: int  # sum of BN channels in one encoder
    crop: int
    embed: int
    bands: int = 5  # SDSS's; workload_from_model sets the survey's
    backward_share: float = 0.5  # of the step: q backward = 2 of MoCo's 4 forward-units
    overlap: float = 0.9  # fraction of the backward that hides the gradient all-reduce
    cycle_ms: float = 1.0  # Horovod's fusion cycle (HOROVOD_CYCLE_TIME)
    step_note: str = ""


def _ranks(n_ranks: int, net: Network) -> tuple[int, int]:
    g = min(n_ranks, net.gpus_per_node)
    return g, max(1, math.ceil(n_ranks / g))


def _lat(n_ranks: int, net: Network) -> float:
    g, n = _ranks(n_ranks, net)
    return (math.log2(g) if g > 1 else 0) * net.alpha_intra_us * 1e-6 + (math.log2(n) if n > 1 else 0) * net.alpha_inter_us * 1e-6


def allreduce_s(nbytes: float, n_ranks: int, net: Network) -> float:
    """Hierarchical all-reduce of ``nbytes`` on every rank: intra reduce-scatter + inter all-reduce + intra all-gather."""
    if n_ranks <= 1:
        return 0.0
    g, n = _ranks(n_ranks, net)
    t = 2 * (g - 1) / g * nbytes / (net.intra_gbs * 1e9)
    if n > 1:
        t += 2 * (n - 1) / n * nbytes / (net.inter_gbs * 1e9)  # the node's share nbytes/g on each of g GPUs' NIC share
    return t + 2 * _lat(n_ranks, net)


def allgather_s(nbytes_per_rank: float, n_ranks: int, net: Network) -> float:
    """All-gather: every rank receives (N - 1) x ``nbytes_per_rank``; inter-node traffic shares the node's NICs."""
    if n_ranks <= 1:
        return 0.0
    g, n = _ranks(n_ranks, net)
    t = (g - 1) * nbytes_per_rank / (net.intra_gbs * 1e9)
    if n > 1:
        t = max(t, g * (n_ranks - g) * nbytes_per_rank / (net.inter_gbs * 1e9))  # into each node, from the others
    return t + _lat(n_ranks, net)


def step_terms(w: Workload, n_ranks: int, net: Network, backend: str, bn: str, queue: str,
               batch: int | None = None, step_s: float | None = None) -> dict[str, float]:
    """Exposed seconds per step of each term at ``n_ranks`` (per-rank ``batch``, compute ``step_s``)."""
    b = batch or w.batch
    t1 = step_s if step_s is not None else w.step_s
    f = 4.0
    img, key = w.bands * w.crop * w.crop * f * b, w.embed * f * b
    calls = 0
    terms = {"gradients": max(0.0, allreduce_s(f * w.params, n_ranks, net) - w.overlap * w.backward_share * t1)}
    if bn == "shuffle":
        terms["shuffle_bn"] = allgather_s(img, n_ranks, net) + allgather_s(key, n_ranks, net)
        calls += 2
    elif bn == "shuffle-node":
        g = min(n_ranks, net.gpus_per_node)
        terms["shuffle_bn"] = allgather_s(img, g, net) + allgather_s(key, g, net)
        calls += 2
    elif bn == "sync":
        per = w.bn_channels * 2 * f / max(w.bn_layers, 1)
        terms["shuffle_bn"] = 3 * w.bn_layers * allreduce_s(per, n_ranks, net)  # q fwd, q bwd, k fwd
        calls += 3 * w.bn_layers
    else:
        terms["shuffle_bn"] = 0.0
    if queue == "sharded":
        nb = n_ranks * b
        terms["queue"] = (allgather_s(key, n_ranks, net) + allreduce_s(nb * w.embed * f, n_ranks, net)
                          + 3 * allreduce_s(nb * f, n_ranks, net))
        calls += 4
    elif queue == "replicated":
        terms["queue"] = allgather_s(key, n_ranks, net)
        calls += 1
    else:
        terms["queue"] = 0.0
    terms["metrics"] = allreduce_s(32, n_ranks, net)
    calls += 1
    if backend == "horovod" and n_ranks > 1:
        terms["horovod_cycle"] = calls * 0.5 * w.cycle_ms * 1e-3
    return terms


def efficiency(w: Workload, n_ranks: int, net: Network, backend: str, bn: str, queue: str,
               kind: str = "weak", global_batch: int | None = None) -> dict:
    """Model efficiency = throughput(N) / (N x throughput(1)) and its terms."""
    if kind == "weak":
        b, t_comp, t_ref = w.batch, w.step_s, w.step_s
    else:
        gb = global_batch or w.batch
        b = gb // n_ranks
        t_comp = w.step_s * b / w.batch  # compute linear in the per-rank batch (small batches are worse)
        t_ref = w.step_s * gb / w.batch / n_ranks
    terms = step_terms(w, n_ranks, net, backend, bn, queue, b, t_comp)
    step = t_comp + sum(terms.values())
    limiting = max(terms, key=terms.get) if any(v > 0 for v in terms.values()) else "compute"
    return {"ranks": n_ranks, "kind": kind, "backend": backend, "bn_mode": bn, "queue_mode": queue,
            "batch_per_rank": b, "step_s": step, "compute_s": t_comp, "terms_s": terms,
            "efficiency": t_ref / step, "limiting": limiting}


def workload_from_model(arch: str, width: int, crop: int | None, embed: int, batch: int, step_s: float, note: str,
                        survey=None) -> Workload:
    """Parameter and BatchNorm counts of the real MoCo query encoder (built once, on the CPU) for the bands of
    ``survey`` (a ``photoz_hpc.survey.Survey``; None: SDSS); ``crop`` None: the survey's."""
    import torch

    from photoz_hpc.config import load_config
    from photoz_hpc.models.moco import build_moco
    from photoz_hpc.survey import default_survey

    survey = survey or default_survey()
    crop = crop or survey.crop_size
    cfg = load_config(None, [f"model.arch={arch}", f"model.width={width}", f"model.embed_dim={embed}",
                             f"loader.batch_size={batch}", f"augment.crop_size={crop}", "moco.bn_mode=none"])
    model = build_moco(cfg, None, survey)
    enc = model.encoder_q
    params = sum(p.numel() for p in enc.parameters() if p.requires_grad)
    bns = [m for m in enc.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    return Workload(step_s, batch, params, len(bns), sum(m.num_features for m in bns), crop, embed,
                    bands=survey.n_bands, step_note=note)


def measured_comparison(paths: list[str], net: Network, bn_mode: str = "shuffle") -> list[dict]:
    """Model vs every measured point of ``benchmarks/scaling.py`` (efficiency against its 1-rank run, the
    model's compute time = that run's step time, its model's parameter and BN counts)."""
    from scaling import efficiencies, load_results

    rows = efficiencies(load_results(paths))
    out, workloads = [], {}
    for r in rows:
        if r["ranks"] == 1 or r["efficiency"] is None:
            continue
        one = next(x for x in rows if x["ranks"] == 1 and x["kind"] == r["kind"] and x["backend"] == r["backend"]
                   and x["queue_mode"] == r["queue_mode"] and x["mode"] == r["mode"]
                   and (x["batch_per_rank"] == r["batch_per_rank"] if r["kind"] == "weak" else x["global_batch"] == r["global_batch"]))
        key = (r["model"], r["crop"], r["embed"])
        if key not in workloads:
            arch, width = r["model"].split("/")
            workloads[key] = workload_from_model(arch, int(width), r["crop"] or 64, r["embed"] or 128, 8, 1.0, "measured")
        w = replace(workloads[key], step_s=one["step_s"], batch=one["batch_per_rank"])
        m = efficiency(w, r["ranks"], net, r["backend"], r["bn_mode"] or bn_mode, r["queue_mode"] or "sharded",
                       r["kind"], r["global_batch"])
        out.append({"kind": r["kind"], "mode": r["mode"], "backend": r["backend"], "queue_mode": r["queue_mode"],
                    "ranks": r["ranks"], "measured": r["efficiency"], "model": m["efficiency"],
                    "limiting": m["limiting"], "measured_comm_ms": None if r["comm_s"] is None else 1e3 * r["comm_s"],
                    "model_comm_ms": 1e3 * sum(m["terms_s"].values())})
    return out


READ_TERMS = ("fs-read", "local-read", "memory-read")


def dataset_workload(w: Workload, ds: Dataset) -> Workload:
    """``w`` with the crop and bands of ``ds``'s survey (the shuffle-BN image gather; the stem's few weights of
    other bands are not recounted)."""
    s = dataset_survey(ds)
    return replace(w, crop=s.crop_size, bands=s.n_bands)


def io_row(w: Workload, n_ranks: int, net: Network, site: Site, ds: Dataset, dtype: str, partition: str,
           backend: str = "torch", bn: str = "shuffle-node", queue: str = "sharded") -> dict:
    """Weak-scaling efficiency with the data path: step = max(t1 + exposed communication, the node's reads),
    loaders prefetching so that reads overlap compute; the limiting term named (see the module docstring)."""
    w = dataset_workload(w, ds)
    e = efficiency(w, n_ranks, net, backend, bn, queue)
    rb = record_bytes(ds, dtype)
    dp = data_path(site, n_ranks, w.batch, rb, ds.records, partition)
    busy, terms = e["step_s"], e["terms_s"]
    if dp.placement == "does not fit":
        step, eff, limiting = math.inf, None, "does not fit"
    else:
        step = max(busy, dp.read_s)
        eff = e["compute_s"] / step
        top = max(terms, key=terms.get)
        limiting = dp.read_term if dp.read_s > busy else top if terms[top] >= 0.01 * step else "compute"
    fits = math.isfinite(step)
    return {"site": site.name, "dataset": ds.name, "dtype": dtype, "partition": partition, "ranks": n_ranks,
            "nodes": nodes_of(n_ranks, site)[1], "backend": backend, "bn_mode": bn, "queue_mode": queue,
            "efficiency": eff, "limiting": limiting, "step_s": step if fits else None, "compute_s": e["compute_s"],
            "comm_s": sum(terms.values()), "terms_s": terms, "read_s": dp.read_s if fits else None,
            "placement": dp.placement, "staged": dp.staged, "stage_s": dp.stage_s if fits else None,
            "node_gb": dp.node_gb, "cache_hit": dp.cache_hit, "record_bytes": rb,
            "bytes_per_step_gpu": dp.step_bytes_gpu, "bytes_per_step_job": n_ranks * dp.step_bytes_gpu,
            "job_read_gbs": n_ranks * dp.step_bytes_gpu / step / 1e9 if fits else None,
            "epoch_s": ds.records / (n_ranks * w.batch) * step if fits else None}


def io_bound_from(w: Workload, net: Network, site: Site, ds: Dataset, dtype: str, partition: str = "global",
                  backend: str = "torch", bn: str = "shuffle-node", queue: str = "sharded") -> int | None:
    """The fewest GPUs (whole nodes, up to the machine's) at which a read term limits the step (as ``io_row``
    decides it); None: never."""
    w, rb = dataset_workload(w, ds), record_bytes(ds, dtype)
    for n in range(1, site.nodes + 1):
        n_gpus = n * site.gpus_per_node
        dp = data_path(site, n_gpus, w.batch, rb, ds.records, partition)
        if dp.placement == "does not fit" or dp.read_s <= w.step_s:  # busy >= compute: no need to price the comm
            continue
        if dp.read_s > efficiency(w, n_gpus, net, backend, bn, queue)["step_s"]:
            return n_gpus
    return None


def node_partition_fits_from(site: Site, ds: Dataset, dtype: str) -> tuple[int | None, int | None]:
    """The fewest GPUs (whole nodes) at which a node's share fits its local disk, and its memory (None: never
    within the machine)."""
    total = ds.records * record_bytes(ds, dtype)
    out = []
    for cap_gb in (max(site.local_disk_gb, site.mem_for_data_gb), site.mem_for_data_gb):
        n = math.ceil(total / (cap_gb * 1e9)) if cap_gb > 0 else None
        out.append(n * site.gpus_per_node if n is not None and n <= site.nodes else None)
    return out[0], out[1]


def _duration(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "-"
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


def _gpus(n: int | None, site: Site) -> str:
    if n is None:
        return f"never within {site.nodes:,} nodes"
    nodes = n // site.gpus_per_node
    return f"{n:,} GPUs ({nodes:,} node{'s' if nodes > 1 else ''})"


def io_tables(w: Workload, sites: list[Site], datasets: list[Dataset], dtypes: list[str], gpus: list[int],
              backend: str = "torch", bn: str = "shuffle-node", queue: str = "sharded",
              shares: tuple[float, ...] = (1.0, 0.25, 0.1), partitions: tuple[str, ...] = PARTITIONS,
              ) -> tuple[list[str], list[dict], list[dict]]:
    """Markdown lines, rows and the I/O-bound scales of every (site, dataset, partition, dtype) at ``gpus``."""
    modes = {"backend": backend, "bn": bn, "queue": queue}
    lines = [f"Data path: step = max(compute + exposed communication, the node's reads per step) (loaders prefetch, "
             f"so reads overlap compute); compute {1e3 * w.step_s:.1f} ms per {w.batch} images ({w.step_note}; "
             f"{w.params / 1e6:.2f} M parameters); "
             f"communication {backend}, BN {bn}, queue {queue}. Cells: weak-scaling efficiency and the limiting term.",
             ""]
    rows, bounds = [], []
    for site in sites:
        net = NETWORKS[site.network]
        if net.gpus_per_node != site.gpus_per_node:
            raise ValueError(f"site '{site.name}': {site.gpus_per_node} GPUs per node, network '{net.name}' has "
                             f"{net.gpus_per_node}")
        lines += [f"#### {site.name}: {site.note}", "",
                  f"{site.gpus_per_node} GPUs and {site.node_mem_gb:g} GB per node ({site.mem_for_data_gb:g} GB for "
                  f"data), node-local disk {site.local_disk_gb:g} GB ({site.local_read_gbs:g} GB/s read, "
                  f"{site.local_write_gbs:g} GB/s write), parallel file system {site.fs_aggregate_gbs:g} GB/s "
                  f"aggregate x {site.fs_share:g} for this job, {site.fs_node_gbs:g} GB/s per node"
                  + (f", {site.fs_iops:.3g} IOPS" if site.fs_iops else ", IOPS not modelled")
                  + f"; network {net.name}.", ""]
        for ds in datasets:
            s = dataset_survey(ds)
            cut = ds.cutout or s.cutout_size
            rb = {d: record_bytes(ds, d) for d in dtypes}
            sizes = ", ".join(f"{d} {rb[d] / 1e3:.0f} kB/record, {ds.records * rb[d] / 1e12:.2f} TB" for d in dtypes)
            gpu_gbs = w.batch * rb[dtypes[0]] / w.step_s / 1e9
            lines += [f"**{ds.name}**: {ds.records / 1e6:g} M records of {cut}x{cut}x{s.n_bands} ({sizes}); crop "
                      f"{s.crop_size}. At the compute rate each GPU reads {gpu_gbs:.2f} GB/s of {dtypes[0]} records: "
                      f"{256 * gpu_gbs:.0f} GB/s for a job of 256 GPUs.", "",
                      "| partition | dtype | " + " | ".join(str(n) for n in gpus) + " |",
                      "|---|---|" + "---|" * len(gpus)]
            place = ["", "Where the records live (staging time, once per run; `fs (hit x%)`: read from the file "
                     "system every epoch, x% from the page cache):", "",
                     "| partition | dtype | " + " | ".join(str(n) for n in gpus) + " |", "|---|---|" + "---|" * len(gpus)]
            for partition in partitions:
                for dtype in dtypes:
                    sel = [io_row(w, n, net, site, ds, dtype, partition, **modes) for n in gpus]
                    rows += sel
                    cells = ["does not fit" if r["efficiency"] is None else f"{100 * r['efficiency']:.0f}% {r['limiting']}"
                             for r in sel]
                    lines.append(f"| {partition} | {dtype} | " + " | ".join(cells) + " |")
                    where = [r["placement"] if r["placement"] == "does not fit"
                             else f"fs (hit {100 * r['cache_hit']:.0f}%)" if r["placement"] == "fs"
                             else f"{r['placement']} ({r['staged']}), {_duration(r['stage_s'])}" for r in sel]
                    place.append(f"| {partition} | {dtype} | " + " | ".join(where) + " |")
            lines += place + [""]
            for dtype in dtypes:
                one = io_row(w, site.gpus_per_node * 2, net, site, ds, dtype, "global", **modes)
                disk, mem = node_partition_fits_from(site, ds, dtype)
                bound = {"site": site.name, "dataset": ds.name, "dtype": dtype,
                         "global_placement": one["placement"], "node_fits_from_gpus": disk,
                         "node_fits_memory_from_gpus": mem, "global_io_bound_from_gpus": {}}
                for share in shares:
                    at = replace(site, fs_share=share)
                    bound["global_io_bound_from_gpus"][str(share)] = io_bound_from(w, net, at, ds, dtype, "global",
                                                                                  backend, bn, queue)
                bounds.append(bound)
    lines += ["#### Where the global partition becomes I/O-bound", "",
              "First scale (whole nodes, up to the machine) at which the global partition's reads limit the step (they "
              "take longer than compute plus communication), the job getting the given share of the file system "
              "(--fs-shares, in place of the site's fs_share); and where node partitions fit (each node's share in its "
              "local disk or memory).", "",
              "| site | dataset | dtype | global: records in | " + " | ".join(f"I/O-bound from, job gets {100 * s:g}% of FS"
                                                                        for s in shares)
              + " | node partitions fit from (disk or memory) | in memory from |",
              "|---|---|---|---|" + "---|" * len(shares) + "---|---|"]
    for b in bounds:
        site = next(s for s in sites if s.name == b["site"])
        place = {"memory": "memory (staged whole)", "local-disk": "local disk (staged whole)",
                 "fs": "file system, every epoch"}[b["global_placement"]]
        cells = [_gpus(b["global_io_bound_from_gpus"][str(s)], site) if b["global_placement"] == "fs"
                 or b["global_io_bound_from_gpus"][str(s)] is not None else "never (staged whole)" for s in shares]
        lines.append(f"| {b['site']} | {b['dataset']} | {b['dtype']} | {place} | " + " | ".join(cells)
                     + f" | {_gpus(b['node_fits_from_gpus'], site)} | {_gpus(b['node_fits_memory_from_gpus'], site)} |")
    return lines, rows, bounds


def load_sites(names: str, site_file: str | None, sets: list[str]) -> list[Site]:
    """Presets named in ``names`` (comma-separated), each with ``site_file``'s and ``sets``' figures; with no
    names, ``site_file`` alone describes a new site (every figure given)."""
    values: dict = {}
    if site_file:
        from photoz_hpc.config import read_yaml_mapping

        values.update(read_yaml_mapping(site_file))  # JSON is YAML too
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--site-set '{item}': use KEY=VALUE")
        values[key.strip()] = value.strip()
    where = ", ".join([*(["--site-file " + site_file] if site_file else []), *(["--site-set"] if sets else [])])
    bases = [n for n in names.split(",") if n] if names else []
    unknown = [n for n in bases if n not in SITES]
    if unknown:
        raise ValueError(f"--site {unknown}: use one of {list(SITES)} (or --site-file alone for a new site)")
    if not bases:
        return [custom_site(None, values, where)]
    return [custom_site(SITES[n], values, where) if values else SITES[n] for n in bases]


def sites_table(sites: list[Site]) -> list[str]:
    """Every figure of ``sites`` with its source (docs/data_at_scale.md)."""
    lines = ["| site | figure | value | source |", "|---|---|---|---|"]
    for site in sites:
        for key, source in site.sources.items():
            lines.append(f"| {site.name} | {key} | {getattr(site, key):g} | {source} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--step-time", type=float, default=None, help="single-GPU step seconds at --batch")
    ap.add_argument("--from", dest="from_json", default=None, help="a train_throughput.py JSON (its synthetic or first result)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--survey", default="sdss", help="the survey of the communication table (bands, default crop)")
    ap.add_argument("--crop", type=int, default=None, help="crop side (default: the survey's, SDSS 64)")
    ap.add_argument("--embed", type=int, default=128)
    ap.add_argument("--network", default="h100-4x200", choices=list(NETWORKS))
    ap.add_argument("--gpus", default="8,16,32,64,128,256,512,1024")
    ap.add_argument("--global-batch", type=int, default=None, help="strong scaling's global batch (default 8 x batch)")
    ap.add_argument("--measured", nargs="*", default=[], help="scaling.py result dirs/JSON to compare with")
    ap.add_argument("--measured-network", default="cpu-gloo-loopback", choices=list(NETWORKS))
    io = ap.add_argument_group("data path (scaling_io.py)")
    io.add_argument("--site", default=None, help=f"site presets, comma-separated: {', '.join(SITES)}")
    io.add_argument("--site-file", default=None, help="YAML/JSON of site figures: overrides the --site presets' "
                    "(or, alone, a new site with every figure)")
    io.add_argument("--site-set", action="append", default=[], metavar="KEY=VALUE",
                    help="one site figure, e.g. fs_share=0.25 or local_disk_gb=0 (repeatable)")
    io.add_argument("--datasets", default="sdss-paper,legacy-76m",
                    help=f"presets ({', '.join(DATASETS)}) or SURVEY:RECORDS[:CUTOUT[:BANDS]], comma-separated")
    io.add_argument("--dtypes", default="float32,float16", help=f"record dtypes ({', '.join(ITEMSIZE)})")
    io.add_argument("--partitions", default="global,node", help="data.partition values to tabulate")
    io.add_argument("--io-backend", default="torch", choices=["torch", "horovod"])
    io.add_argument("--io-bn", default="shuffle-node", choices=["shuffle", "shuffle-node", "sync", "none"])
    io.add_argument("--io-queue", default="sharded", choices=["sharded", "replicated", "local"])
    io.add_argument("--fs-shares", default="1,0.25,0.1",
                    help="the job's shares of the file system for the I/O-bound table (each replaces fs_share)")
    io.add_argument("--io-only", action="store_true", help="only the data-path tables (needs a site)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args(argv)

    from photoz_hpc.survey import load_survey

    try:
        survey = load_survey(args.survey)
        sites = load_sites(args.site, args.site_file, args.site_set) if (args.site or args.site_file) else []
        datasets = [parse_dataset(d) for d in args.datasets.split(",") if d]
        dtypes = [d for d in args.dtypes.split(",") if d]
        bad = [d for d in dtypes if d not in ITEMSIZE]
        if bad:
            raise ValueError(f"--dtypes {bad}: use {list(ITEMSIZE)}")
        for ds in datasets:
            dataset_survey(ds)
        shares = tuple(float(x) for x in args.fs_shares.split(","))
        partitions = tuple(p for p in args.partitions.split(",") if p)
        if not partitions or set(partitions) - set(PARTITIONS):
            raise ValueError(f"--partitions {args.partitions!r}: use {list(PARTITIONS)}")
        unknown = [s.network for s in sites if s.network not in NETWORKS]
        if unknown:
            raise ValueError(f"site network {unknown}: use one of {list(NETWORKS)}")
    except Exception as exc:  # noqa: BLE001 - bad input of any kind becomes one clear CLI error
        ap.error(str(exc))
    if args.io_only and not sites:
        ap.error("--io-only needs --site or --site-file")
    if args.from_json:
        blob = json.loads(Path(args.from_json).read_text())
        r = next((x for x in blob["results"] if x["mode"] == "synthetic"), blob["results"][0])
        step_s, batch, note = r["step_s"], r["batch_per_rank"], f"measured ({args.from_json}, {r['mode']})"
    elif args.step_time:
        step_s, batch, note = args.step_time, args.batch, "given (--step-time)"
    else:
        step_s, batch, note = args.batch / 4000.0, args.batch, "the goal (4,000 img/s), not measured"
    w = workload_from_model(args.arch, args.width, args.crop, args.embed, batch, step_s, note, survey)
    net = NETWORKS[args.network]
    gpus = [int(g) for g in args.gpus.split(",")]
    gb = args.global_batch or 8 * batch
    lines: list[str] = []
    rows: list[dict] = []
    comparison: list[dict] = []
    if not args.io_only:
        rows = [efficiency(w, n, net, backend, bn, queue, kind, gb)
                for kind in ("weak", "strong") for backend in ("torch", "horovod")
                for bn in ("shuffle", "shuffle-node", "sync", "none") for queue in ("sharded", "replicated", "local")
                for n in gpus if kind == "weak" or gb % n == 0 and gb // n >= 8]
        lines += [f"Workload: {args.arch}/{args.width}, {w.params / 1e6:.2f} M parameters, {w.bn_layers} BN layers "
                  f"({w.bn_channels} channels), {survey.name} {w.bands} bands, crop {w.crop}, batch {w.batch}/GPU, "
                  f"step {1e3 * w.step_s:.1f} ms ({note}); network {net.name}: {net.note}.", "",
                  "| kind | backend | BN | queue | " + " | ".join(f"{n}" for n in gpus) + " | limiting at the largest N |",
                  "|---|---|---|---|" + "---|" * len(gpus) + "---|"]
        for kind in ("weak", "strong"):
            for backend in ("torch", "horovod"):
                for bn in ("shuffle", "shuffle-node", "sync", "none"):
                    for queue in ("sharded", "replicated", "local"):
                        sel = {r["ranks"]: r for r in rows if (r["kind"], r["backend"], r["bn_mode"], r["queue_mode"]) == (kind, backend, bn, queue)}
                        if not sel:
                            continue
                        cells = [f"{100 * sel[n]['efficiency']:.0f}%" if n in sel else "-" for n in gpus]
                        last = sel[max(sel)]
                        lim = f"{last['limiting']} ({1e3 * last['terms_s'].get(last['limiting'], 0):.1f} ms)"
                        lines.append(f"| {kind} | {backend} | {bn} | {queue} | " + " | ".join(cells) + f" | {lim} |")
        n256 = next((r for r in rows if (r["kind"], r["backend"], r["bn_mode"], r["queue_mode"], r["ranks"])
                     == ("weak", "torch", "shuffle", "sharded", 256)), None)
        if n256:
            img = w.bands * w.crop * w.crop * 4 * w.batch
            g = net.gpus_per_node
            lines += ["", f"Shuffle-BN at 256 GPUs: each rank receives {255 * img / 1e9:.2f} GB of key images per step "
                      f"({img / 1e6:.1f} MB from each other rank), {1e3 * n256['terms_s']['shuffle_bn']:.1f} ms of a "
                      f"{1e3 * n256['step_s']:.1f} ms step; within a node ({g} GPUs) it is "
                      f"{1e3 * step_terms(w, g, net, 'torch', 'shuffle', 'local')['shuffle_bn']:.2f} ms."]
        if args.measured:
            comparison = measured_comparison(args.measured, NETWORKS[args.measured_network])
            lines += ["", f"Measured vs model ({args.measured_network}: {NETWORKS[args.measured_network].note}):", "",
                      "| kind | mode | backend | queue | ranks | measured | model | model limiting | comm ms measured / model |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for c in comparison:
                mc = "-" if c["measured_comm_ms"] is None else f"{c['measured_comm_ms']:.1f}"
                lines.append(f"| {c['kind']} | {c['mode']} | {c['backend']} | {c['queue_mode']} | {c['ranks']} | "
                             f"{100 * c['measured']:.0f}% | {100 * c['model']:.0f}% | {c['limiting']} | {mc} / {c['model_comm_ms']:.1f} |")
    io_blob = None
    if sites:
        io_lines, io_rows, bounds = io_tables(w, sites, datasets, dtypes, gpus, args.io_backend, args.io_bn,
                                              args.io_queue, shares, partitions)
        lines += ([""] if lines else []) + io_lines
        io_blob = {"sites": [asdict(s) for s in sites], "datasets": [asdict(d) for d in datasets], "dtypes": dtypes,
                   "rows": io_rows, "io_bound": bounds}
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"workload": asdict(w), "network": asdict(net), "rows": rows,
                                               "measured_comparison": comparison, "io": io_blob}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
