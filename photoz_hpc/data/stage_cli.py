"""Command ``stage``: the node-local copy a Slurm job trains from (``slurm/common.sh`` runs it on every node)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from photoz_hpc.data.partition import PARTITIONS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stage",
        help="copy a dataset, or one node's shards of it, to node-local storage, checksums verified",
        description="Copy the prepared dataset SRC into DEST (replaced if it exists), file by file in parallel, each "
        "checked against the manifest's sha256 as it is copied. With --partition node only the shards of node "
        "--node of --nodes (data.partition=node, the deal the training computes) are copied, plus every shard's "
        "metadata. DEST/staged.json, written last, marks the copy complete. Prints one line to stderr (bytes, "
        "seconds, MB/s); a checksum mismatch removes DEST and names the source file.",
    )
    p.add_argument("src", help="prepared dataset directory (on the shared file system)")
    p.add_argument("dest", help="node-local target directory (e.g. under /dev/shm, node memory, or a local disk)")
    p.add_argument("--partition", choices=PARTITIONS, default="global",
                   help="global: every shard (default); node: only this node's shards (data.partition=node)")
    p.add_argument("--node", type=int, default=None, help="this node's index (default $SLURM_NODEID, else 0)")
    p.add_argument("--nodes", type=int, default=None, help="the job's node count (default $SLURM_JOB_NUM_NODES, else 1)")
    p.add_argument("--workers", type=int, default=4, help="files copied at once (default 4)")
    p.add_argument("--json", action="store_true", help="also print the statistics as JSON on stdout")
    p.set_defaults(func=_stage)


def _from_env(value: int | None, var: str, default: int) -> int:
    from photoz_hpc.errors import PhotozError

    if value is not None:
        return value
    text = os.environ.get(var, "").strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise PhotozError(f"${var}={text!r} is not an integer (pass --node/--nodes)") from None


def _stage(args: argparse.Namespace) -> int:
    from photoz_hpc.data.stage import stage_dataset

    node = _from_env(args.node, "SLURM_NODEID", 0)
    nodes = _from_env(args.nodes, "SLURM_JOB_NUM_NODES", 1)
    stats = stage_dataset(args.src, args.dest, args.partition, node, nodes, args.workers)
    print(f"photoz: staged {args.src} on {stats['host']} in {args.dest} (node {node} of {nodes}, partition "
          f"{args.partition}: {stats['shards_copied']} of {stats['shards_total']} shards, {stats['bytes']} bytes in "
          f"{stats['seconds']:.2f} s, {stats['mb_per_s']:.1f} MB/s; checksums verified)", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(stats))
    return 0
