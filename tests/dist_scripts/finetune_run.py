"""``run_finetune`` with the real loaders, optionally SIGKILLing itself after a given step (as
``pretrain_run.py``). Prints the summary as JSON on rank 0; exits 75 when pre-empted, like the CLI."""

from __future__ import annotations

import argparse
import json
import sys

from pretrain_run import KillingLoader

from photoz_hpc.comm.select import init_comm
from photoz_hpc.config import FinetuneRunConfig, load_config
from photoz_hpc.launch_env import detect_env
from photoz_hpc.logs import setup_logging
from photoz_hpc.train.finetune import finetune_loaders, run_finetune, select_data
from photoz_hpc.train.signals import EXIT_PREEMPTED


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kill-after", type=int, default=0)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(None, args.overrides, root=FinetuneRunConfig)
    setup_logging("INFO", rank=detect_env().rank)
    comm = init_comm(cfg.dist.backend, cfg.dist.timeout_s, "cpu")
    loader = None
    if args.kill_after:
        loader = KillingLoader(finetune_loaders(cfg, comm, select_data(cfg))[0], args.kill_after)
    summary = run_finetune(cfg, comm=comm, loader=loader)
    comm.shutdown()
    if comm.rank == 0:
        print("SUMMARY " + json.dumps(summary), flush=True)
    return EXIT_PREEMPTED if summary["preempted"] else 0


if __name__ == "__main__":
    sys.exit(main())
