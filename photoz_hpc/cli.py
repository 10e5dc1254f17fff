"""The one CLI: ``photoz-hpc <command>``. Each command lives next to the code it drives.

A command module defines ``register(subparsers)``, which adds its parser and sets ``func``.
Modules are imported here but keep heavy imports (torch, DALI, GalSim) inside the command body,
so ``photoz-hpc --help`` stays fast. A command that reads model or checkpoint files adds
``torch_files.add_trust_pickle_flag``; ``--trust-pickle`` then holds for the whole command.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from photoz_hpc.errors import PhotozError
from photoz_hpc.logs import setup_logging
from photoz_hpc.torch_files import trusting_pickle
from photoz_hpc.version import __version__

#: Command modules in the order they appear in ``--help`` (the data flow: data -> ... -> evaluate -> launch).
COMMAND_MODULES = (
    "photoz_hpc.sim.cli",
    "photoz_hpc.data.cli",
    "photoz_hpc.data.stage_cli",
    "photoz_hpc.augment.cli",
    "photoz_hpc.models.cli",
    "photoz_hpc.train.cli",
    "photoz_hpc.evaluate.cli",
    "photoz_hpc.evaluate.similarity_cli",
    "photoz_hpc.launch.photoz_cli",
    "photoz_hpc.launch.sweep_cli",
    "photoz_hpc.launch.quickstart",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="photoz-hpc",
        description="Self-supervised photometric redshifts from multi-band survey images (SDSS, Legacy Surveys, HSC, LSST...) on HPC systems.",
    )
    parser.add_argument("--version", action="version", version=f"photoz-hpc {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="logging threshold (default INFO)")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


_STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR1")


def main(argv: list[str] | None = None) -> int:
    """Run one command in this process and give the caller (a test, a notebook, a workflow tool) the process's
    signal handlers back as they were: commands install pre-emption handlers and end by ignoring SIGTERM."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return console_main(argv)
    saved = {name: signal.getsignal(getattr(signal, name)) for name in _STOP_SIGNALS}
    try:
        return console_main(argv)
    finally:
        for name, handler in saved.items():
            signal.signal(getattr(signal, name), handler)


def console_main(argv: list[str] | None = None) -> int:
    """The ``photoz-hpc`` process: the handlers a command leaves stay in force until the process exits (a late
    SIGTERM during interpreter shutdown must not turn a saved, pre-empted run's exit code 75 into 143)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    setup_logging(args.log_level)
    try:
        if getattr(args, "overrides", None):  # a GPU asked for on the command line is never replaced by the CPU
            from photoz_hpc.comm.devices import check_gpu_requests

            check_gpu_requests(args.overrides)
        with trusting_pickle(getattr(args, "trust_pickle", False)):
            result = args.func(args)
    except PhotozError as exc:
        print(f"photoz-hpc {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"photoz-hpc {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(console_main())
