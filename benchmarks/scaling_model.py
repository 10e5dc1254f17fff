"""An analytic model of MoCo pretraining scaling efficiency, per backend, BN mode and queue mode.

  python benchmarks/scaling_model.py [--step-time S | --from THROUGHPUT.json] [--batch 256] [--arch resnet50]
      [--width 64] [--crop 64] [--embed 128] [--network h100-4x200] [--gpus 8,16,...,1024]
      [--measured SCALING_DIR ...] [--json OUT] [--markdown OUT.md]

Weak scaling (per-GPU batch B fixed): efficiency(N) = t1 / (t1 + exposed communication per step), t1 the
measured single-GPU step time (``--from`` a ``train_throughput.py`` JSON, or ``--step-time``; the default is
the goal, 256 images / 4,000 img/s = 64 ms, marked as not measured). Per step and rank:

* gradient all-reduce of the query encoder's fp32 gradients (4 P bytes), overlapped with the backward
  (``overlap`` x the backward's share of the step, 2/4 of MoCo's FLOPs), the rest exposed;
* shuffle-BN (``shuffle``): all-gather of the key images (B x 5 x S x S x 4 bytes per rank: every rank
  receives (N - 1) times that) and of the keys (B x d x 4), in the forward, not overlapped; grows with N.
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
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # scaling.py (the measured points)


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
    bands: int = 5
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


def workload_from_model(arch: str, width: int, crop: int, embed: int, batch: int, step_s: float, note: str) -> Workload:
    """Parameter and BatchNorm counts of the real MoCo query encoder (built once, on the CPU)."""
    import torch

    from photoz_hpc.config import load_config
    from photoz_hpc.models.moco import build_moco

    cfg = load_config(None, [f"model.arch={arch}", f"model.width={width}", f"model.embed_dim={embed}",
                             f"loader.batch_size={batch}", f"augment.crop_size={crop}", "moco.bn_mode=none"])
    model = build_moco(cfg, None)
    enc = model.encoder_q
    params = sum(p.numel() for p in enc.parameters() if p.requires_grad)
    bns = [m for m in enc.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    return Workload(step_s, batch, params, len(bns), sum(m.num_features for m in bns), crop, embed, step_note=note)


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--step-time", type=float, default=None, help="single-GPU step seconds at --batch")
    ap.add_argument("--from", dest="from_json", default=None, help="a train_throughput.py JSON (its synthetic or first result)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--embed", type=int, default=128)
    ap.add_argument("--network", default="h100-4x200", choices=list(NETWORKS))
    ap.add_argument("--gpus", default="8,16,32,64,128,256,512,1024")
    ap.add_argument("--global-batch", type=int, default=None, help="strong scaling's global batch (default 8 x batch)")
    ap.add_argument("--measured", nargs="*", default=[], help="scaling.py result dirs/JSON to compare with")
    ap.add_argument("--measured-network", default="cpu-gloo-loopback", choices=list(NETWORKS))
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args(argv)

    if args.from_json:
        blob = json.loads(Path(args.from_json).read_text())
        r = next((x for x in blob["results"] if x["mode"] == "synthetic"), blob["results"][0])
        step_s, batch, note = r["step_s"], r["batch_per_rank"], f"measured ({args.from_json}, {r['mode']})"
    elif args.step_time:
        step_s, batch, note = args.step_time, args.batch, "given (--step-time)"
    else:
        step_s, batch, note = args.batch / 4000.0, args.batch, "the goal (4,000 img/s), not measured"
    w = workload_from_model(args.arch, args.width, args.crop, args.embed, batch, step_s, note)
    net = NETWORKS[args.network]
    gpus = [int(g) for g in args.gpus.split(",")]
    gb = args.global_batch or 8 * batch
    rows = [efficiency(w, n, net, backend, bn, queue, kind, gb)
            for kind in ("weak", "strong") for backend in ("torch", "horovod")
            for bn in ("shuffle", "shuffle-node", "sync", "none") for queue in ("sharded", "replicated", "local")
            for n in gpus if kind == "weak" or gb % n == 0 and gb // n >= 8]
    lines = [f"Workload: {args.arch}/{args.width}, {w.params / 1e6:.2f} M parameters, {w.bn_layers} BN layers "
             f"({w.bn_channels} channels), crop {w.crop}, batch {w.batch}/GPU, step {1e3 * w.step_s:.1f} ms ({note}); "
             f"network {net.name}: {net.note}.", "",
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
        img = 5 * w.crop * w.crop * 4 * w.batch
        lines += ["", f"Shuffle-BN at 256 GPUs: each rank receives {255 * img / 1e9:.2f} GB of key images per step "
                  f"({img / 1e6:.1f} MB from each other rank), {1e3 * n256['terms_s']['shuffle_bn']:.1f} ms of a "
                  f"{1e3 * n256['step_s']:.1f} ms step; within a node (8 GPUs) it is "
                  f"{1e3 * step_terms(w, 8, net, 'torch', 'shuffle', 'local')['shuffle_bn']:.2f} ms."]
    comparison = []
    if args.measured:
        comparison = measured_comparison(args.measured, NETWORKS[args.measured_network])
        lines += ["", f"Measured vs model ({args.measured_network}: {NETWORKS[args.measured_network].note}):", "",
                  "| kind | mode | backend | queue | ranks | measured | model | model limiting | comm ms measured / model |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for c in comparison:
            mc = "-" if c["measured_comm_ms"] is None else f"{c['measured_comm_ms']:.1f}"
            lines.append(f"| {c['kind']} | {c['mode']} | {c['backend']} | {c['queue_mode']} | {c['ranks']} | "
                         f"{100 * c['measured']:.0f}% | {100 * c['model']:.0f}% | {c['limiting']} | {mc} / {c['model_comm_ms']:.1f} |")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"workload": asdict(w), "network": asdict(net), "rows": rows,
                                               "measured_comparison": comparison}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
