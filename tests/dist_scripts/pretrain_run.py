"""``run_pretrain`` with the real loader, optionally SIGKILLing itself after a given step.

Used by the resume and failure tests: ``--kill-after N`` kills this process (``--kill-rank`` only that
rank) when it fetches the batch after step N, i.e. with no chance to clean up; ``--hang-after N`` makes
it hang instead (alive, sleeping forever in the main thread, so its peers block in their next collective);
``--ranks-per-node K`` declares nodes of K ranks (``declared_nodes.py``); ``--pause-after N --until FILE``
makes it wait (alive, holding its directory) before batch N+1 until FILE exists (the run-lock tests start a
second run meanwhile).
Test-only hooks: the trainer itself has none. Prints the summary as JSON on rank 0 and exits 75 when
pre-empted, like the CLI.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

from declared_nodes import declare_nodes

from photoz_hpc.comm.select import init_comm
from photoz_hpc.config import load_config
from photoz_hpc.launch_env import detect_env
from photoz_hpc.logs import setup_logging
from photoz_hpc.train.pretrain import _build_loader, run_pretrain
from photoz_hpc.train.signals import EXIT_PREEMPTED


class KillingLoader:
    """Proxy for a loader that SIGKILLs the process when batch number ``after + 1`` is requested."""

    def __init__(self, inner, after: int, start_step: int = 0) -> None:
        self.inner, self.after, self.count = inner, after, start_step

    def __len__(self) -> int:
        return len(self.inner)

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        self.inner.load_state_dict(sd)

    def __getattr__(self, name: str):  # check_partition, read_stats, ...: the real loader's
        return getattr(self.inner, name)

    def __iter__(self):
        for batch in self.inner:
            if self.count >= self.after:
                self.fail()
            self.count += 1
            yield batch

    def fail(self) -> None:
        os.kill(os.getpid(), signal.SIGKILL)


class HangingLoader(KillingLoader):
    """Like ``KillingLoader`` but the process stays alive and never returns the batch (a hung rank)."""

    def fail(self) -> None:
        print(f"TEST: hanging after {self.after} steps", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)


class PausingLoader(KillingLoader):
    """Like ``KillingLoader`` but waits until the file ``until`` exists, then goes on unharmed."""

    def __init__(self, inner, after: int, until: str) -> None:
        super().__init__(inner, after)
        self.until = until

    def fail(self) -> None:
        if self.count == self.after:
            print(f"TEST: paused after {self.after} steps", file=sys.stderr, flush=True)
            while not os.path.exists(self.until):
                time.sleep(0.1)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kill-after", type=int, default=0)
    ap.add_argument("--kill-rank", type=int, default=-1, help="-1: every rank")
    ap.add_argument("--hang-after", type=int, default=0)
    ap.add_argument("--hang-rank", type=int, default=-1, help="-1: every rank")
    ap.add_argument("--pause-after", type=int, default=0)
    ap.add_argument("--until", default="", help="with --pause-after: the file to wait for")
    ap.add_argument("--ranks-per-node", type=int, default=0, help="0: as launched")
    ap.add_argument("--node-data", default="", help="data.path of each declared node: a path with {node} in it "
                    "(node-local copies, which on a real cluster share one path on different disks)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    declare_nodes(args.ranks_per_node)
    env = detect_env()
    node_data = []
    if args.node_data:
        node_data = ["data.path=" + args.node_data.format(node=env.rank // max(args.ranks_per_node, 1))]
    cfg = load_config(None, args.overrides + node_data)
    setup_logging("INFO", rank=env.rank)
    comm = init_comm(cfg.dist.backend, cfg.dist.timeout_s, "cpu", node_groups=cfg.moco.bn_mode == "shuffle-node")
    loader = _build_loader(cfg, comm)
    if args.kill_after and args.kill_rank in (-1, comm.rank):
        loader = KillingLoader(loader, args.kill_after)
    if args.hang_after and args.hang_rank in (-1, comm.rank):
        loader = HangingLoader(loader, args.hang_after)
    if args.pause_after:
        loader = PausingLoader(loader, args.pause_after, args.until)
    summary = run_pretrain(cfg, loader=loader, comm=comm)
    comm.shutdown()
    if comm.rank == 0:
        print("SUMMARY " + json.dumps(summary), flush=True)
    return EXIT_PREEMPTED if summary["preempted"] else 0


if __name__ == "__main__":
    sys.exit(main())
