"""Weak and strong scaling of MoCo pretraining throughput over ranks, backends and queue modes.

  python benchmarks/scaling.py run --config configs/demo.yaml --data DIR --out RESULTS_DIR
      [--ranks 1,2] [--backends torch,horovod] [--kinds weak,strong] [--batch 64] [--global-batch 128]
      [--queue-modes sharded] [--mode synthetic|end2end] [--threads-per-rank 1] [--warmup 3] [--windows 3]
      [--window-steps 5] [-- key=value ...]
  python benchmarks/scaling.py report RESULTS_DIR [MORE_DIRS or JSON ...] [--table OUT.md] [--plot OUT.png]

``run`` starts ``benchmarks/train_throughput.py`` once per (backend, queue mode, kind, ranks) on this host:
the torch backend as torchrun does (RANK, WORLD_SIZE, MASTER_ADDR/PORT, one process per rank; Gloo on CPU,
NCCL on GPU), Horovod through ``horovodrun --gloo -np N``. Weak scaling keeps the per-rank batch
(``--batch``), strong scaling the global batch (``--global-batch``, per rank global / N). Every run writes
one JSON (``<kind>-<backend>-<queue>-n<N>.json``). On a cluster, ``slurm/benchmark_scaling.sh --submit 1 2 4``
runs ``train_throughput.py --json`` under srun once per node count, naming its JSONs the same way, and
``report``s the directory.

``report`` merges every JSON it is given (files, or directories searched recursively) into one table:
efficiency = throughput(N) / (N x throughput(1)) against the 1-rank run of the same kind, backend, queue
mode and mode (weak: the same per-rank batch; strong: the same global batch), with the 95% intervals of the
throughputs, and a plot of efficiency against ranks. The kind is the JSON's ``kind`` (``run`` adds it), else
the file name's prefix (``weak-...``, ``strong-...``).
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

REPO = Path(__file__).resolve().parents[1]
THROUGHPUT = REPO / "benchmarks" / "train_throughput.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(backend: str, n: int, argv: list[str], threads: int, timeout: float) -> tuple[int, str]:
    """Run ``train_throughput.py argv`` on ``n`` local ranks with ``backend``; (exit code, output)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1",
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, str(THROUGHPUT), *argv]
    if backend == "horovod":
        p = subprocess.run(["horovodrun", "--gloo", "-np", str(n), "-H", f"localhost:{n}", *cmd], env=env, cwd=REPO,
                           text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
        return p.returncode, p.stdout
    port = str(free_port())
    procs = [subprocess.Popen(cmd, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for r in range(n)]
    outs, rc = [], 0
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
            rc = rc or p.returncode
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        return 124, "\n".join(p.communicate()[0] or "" for p in procs)
    return rc, outs[0] + "".join(o for o in outs[1:] if "Error" in o or "Traceback" in o)


def cmd_run(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ranks = [int(r) for r in args.ranks.split(",")]
    failed = 0
    for backend in args.backends.split(","):
        for queue in args.queue_modes.split(","):
            for kind in args.kinds.split(","):
                for n in ranks:
                    batch = args.batch if kind == "weak" else args.global_batch // n
                    if kind == "strong" and args.global_batch % n:
                        print(f"skip strong n={n}: global batch {args.global_batch} not divisible")
                        continue
                    name = f"{kind}-{backend}-{queue}-n{n}"
                    path = out / f"{name}.json"
                    argv = ["--modes", args.mode, "--warmup", str(args.warmup), "--windows", str(args.windows),
                            "--window-steps", str(args.window_steps), "--json", str(path)]
                    if args.config:
                        argv += ["--config", args.config]
                    if args.data:
                        argv += ["--data", args.data]
                    argv += [f"dist.backend={backend}", f"moco.queue_mode={queue}", f"loader.batch_size={batch}",
                             f"train.cpu_threads={args.threads_per_rank}", f"loader.num_threads={args.threads_per_rank}",
                             *args.overrides]
                    t0 = time.time()
                    rc, log = launch(backend, n, argv, args.threads_per_rank, args.timeout)
                    (out / f"{name}.log").write_text(log)
                    if rc == 0 and path.exists():
                        blob = json.loads(path.read_text())
                        blob.update(kind=kind, scaling_backend=backend, ranks=n)
                        path.write_text(json.dumps(blob, indent=1))
                        r = blob["results"][0]
                        print(f"{name:28s} {r['img_per_s']:8.1f} +- {r['img_per_s_ci95']:.1f} img/s "
                              f"({time.time() - t0:.0f} s)", flush=True)
                    else:
                        failed += 1
                        print(f"{name:28s} FAILED (exit {rc}); see {out / (name + '.log')}\n{log[-1500:]}", flush=True)
    return 1 if failed else 0


def load_results(paths: list[str]) -> list[dict]:
    """Every scaling JSON under ``paths``: one row per (file, mode)."""
    files: list[Path] = []
    for p in map(Path, paths):
        files += sorted(p.rglob("*.json")) if p.is_dir() else [p]
    rows = []
    for f in files:
        blob = json.loads(f.read_text())
        if not isinstance(blob, dict) or blob.get("benchmark") != "train_throughput":
            continue  # e.g. a report's own --json
        kind = blob.get("kind") or _kind_from_name(f)
        for r in blob["results"]:
            rows.append({"file": str(f), "kind": kind, "backend": blob.get("scaling_backend") or r["backend"],
                         "queue_mode": blob.get("queue_mode"), "mode": r["mode"], "ranks": r["world_size"],
                         "batch_per_rank": r["batch_per_rank"], "global_batch": r["global_batch"],
                         "img_per_s": r["img_per_s"], "ci95": r["img_per_s_ci95"], "step_s": r["step_s"],
                         "comm_s": (r.get("breakdown_s") or {}).get("comm"), "machine": blob.get("machine"),
                         "model": blob.get("model"), "crop": blob.get("crop"), "embed": blob.get("embed"),
                         "bn_mode": blob.get("bn_mode"),
                         "gpu": blob.get("gpu"), "date": blob.get("date"), "load": blob.get("load_avg_before")})
    return rows


def _kind_from_name(path: Path) -> str:
    """weak or strong from a ``<kind>-<backend>-<queue>-n<N>.json`` name (weak when the name does not say)."""
    prefix = path.name.split("-", 1)[0]
    return prefix if prefix in ("weak", "strong") else "weak"


def efficiencies(rows: list[dict]) -> list[dict]:
    """Adds ``efficiency`` = img/s(N) / (N x img/s(1)) against the matching 1-rank row (None without one)."""
    def group(r):
        size = r["batch_per_rank"] if r["kind"] == "weak" else r["global_batch"]
        return r["kind"], r["backend"], r["queue_mode"], r["mode"], size

    base = {group(r): r for r in rows if r["ranks"] == 1}
    for r in rows:
        one = base.get(group(r))
        r["efficiency"] = r["img_per_s"] / (r["ranks"] * one["img_per_s"]) if one else None
    return sorted(rows, key=lambda r: (r["kind"], r["mode"], r["backend"], r["queue_mode"] or "", r["ranks"]))


def table(rows: list[dict]) -> str:
    lines = ["| kind | mode | backend | queue | ranks | batch/rank | global | img/s (95% CI) | step ms | comm ms | efficiency |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        eff = f"{100 * r['efficiency']:.0f}%" if r["efficiency"] is not None else "-"
        comm = f"{1e3 * r['comm_s']:.1f}" if r["comm_s"] is not None else "-"
        lines.append(f"| {r['kind']} | {r['mode']} | {r['backend']} | {r['queue_mode']} | {r['ranks']} | "
                     f"{r['batch_per_rank']} | {r['global_batch']} | {r['img_per_s']:.1f} +- {r['ci95']:.1f} | "
                     f"{1e3 * r['step_s']:.1f} | {comm} | {eff} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    series: dict[tuple, list] = {}
    for r in rows:
        if r["efficiency"] is not None:
            series.setdefault((r["kind"], r["mode"], r["backend"], r["queue_mode"]), []).append((r["ranks"], r["efficiency"]))
    for key, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=" ".join(str(k) for k in key))
    ax.axhline(100, color="grey", lw=0.5)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("ranks")
    ax.set_ylabel("efficiency (%) = img/s(N) / (N img/s(1))")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_report(args) -> int:
    rows = efficiencies(load_results(args.paths))
    if not rows:
        print("no train_throughput JSON found", file=sys.stderr)
        return 1
    text = table(rows)
    print(text)
    if args.table:
        Path(args.table).write_text(text + "\n")
    if args.plot:
        plot(rows, Path(args.plot))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--config", default=None)
    r.add_argument("--data", default=None)
    r.add_argument("--out", required=True)
    r.add_argument("--ranks", default="1,2")
    r.add_argument("--backends", default="torch,horovod")
    r.add_argument("--kinds", default="weak,strong")
    r.add_argument("--queue-modes", default="sharded")
    r.add_argument("--batch", type=int, default=64, help="weak scaling: per-rank batch")
    r.add_argument("--global-batch", type=int, default=128, help="strong scaling: global batch")
    r.add_argument("--mode", default="synthetic", choices=["synthetic", "end2end"])
    r.add_argument("--threads-per-rank", type=int, default=1)
    r.add_argument("--warmup", type=int, default=3)
    r.add_argument("--windows", type=int, default=3)
    r.add_argument("--window-steps", type=int, default=5)
    r.add_argument("--timeout", type=float, default=600)
    r.add_argument("overrides", nargs="*")
    rp = sub.add_parser("report")
    rp.add_argument("paths", nargs="+")
    rp.add_argument("--table", default=None)
    rp.add_argument("--plot", default=None)
    rp.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    return cmd_run(args) if args.command == "run" else cmd_report(args)


if __name__ == "__main__":
    sys.exit(main())
