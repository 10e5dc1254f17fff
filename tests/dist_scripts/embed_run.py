"""``photoz-hpc embed`` on every rank of a torchrun-like launch, ``--repeat`` times in one process (each
run sets up and shuts down its own communicator, as ``finetune --sweep --task-id all`` does per task)."""

from __future__ import annotations

import argparse
import sys

from photoz_hpc.cli import main as cli_main


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--out", required=True)
    a, rest = ap.parse_known_args()  # the rest goes to embed: --checkpoint, --data, overrides
    for i in range(a.repeat):
        rc = cli_main(["embed", "--out", f"{a.out}/run{i}", *rest])
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
