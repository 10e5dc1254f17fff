"""``run_predict`` as the ``predict`` command runs it, optionally SIGKILLing itself (a crash) or sending
itself SIGUSR1 (a pre-emption) after its rank has written N parts. Prints the report as JSON on rank 0;
exits 75 when pre-empted, like the CLI."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from photoz_hpc.evaluate.catalogue import PredictOptions, run_predict
from photoz_hpc.launch_env import detect_env
from photoz_hpc.logs import setup_logging
from photoz_hpc.train.signals import EXIT_PREEMPTED


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", nargs="+", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--format", default="parquet")
    ap.add_argument("--pdf", action="store_true")
    ap.add_argument("--block", default=None)
    ap.add_argument("--kill-after-parts", type=int, default=0)
    ap.add_argument("--signal-after-parts", type=int, default=0)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    setup_logging("INFO", rank=detect_env().rank)
    written = []

    def on_part(part, done):
        written.append(part.name)
        if args.kill_after_parts and len(written) == args.kill_after_parts:
            os.kill(os.getpid(), signal.SIGKILL)
        if args.signal_after_parts and len(written) == args.signal_after_parts:
            os.kill(os.getpid(), signal.SIGUSR1)

    opts = PredictOptions(fmt=args.format, with_pdf=args.pdf, batch_size=args.batch_size)
    report = run_predict(args.checkpoint, args.data, args.out, opts, args.block, args.overrides, on_part=on_part)
    if detect_env().rank == 0:
        print("REPORT " + json.dumps(report), flush=True)
    return EXIT_PREEMPTED if report["preempted"] else 0


if __name__ == "__main__":
    sys.exit(main())
