"""The one logging path: every module logs through ``get_logger``; rank 0 prints INFO."""

from __future__ import annotations

import logging
import os
import sys

from photoz_hpc.errors import PhotozError
from photoz_hpc.launch_env import ENV_SOURCES, detect_env

_ROOT = "photoz_hpc"


def _rank_from_env() -> int:
    """This process's rank for the log tag: ``PHOTOZ_RANK`` if set, else the shared launcher detector
    (``launch_env.detect_env``, the same order the trainer uses), else any launcher's rank variable."""
    if "PHOTOZ_RANK" in os.environ:
        try:
            return int(os.environ["PHOTOZ_RANK"])
        except ValueError:
            pass
    try:
        env = detect_env()
        if env.launcher != "none":
            return env.rank
    except PhotozError:  # a malformed variable: logging must not fail, fall through to the scan
        pass
    for _, key, _, _ in ENV_SOURCES:  # a rank variable without its world size
        if key in os.environ:
            try:
                return int(os.environ[key])
            except ValueError:
                continue
    return 0


def setup_logging(level: str | int = "INFO", rank: int | None = None) -> logging.Logger:
    """Configure the package logger once: rank 0 at ``level``, other ranks WARNING, rank-tagged."""
    rank = _rank_from_env() if rank is None else rank
    logger = logging.getLogger(_ROOT)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(level if rank == 0 else logging.WARNING)
    logger.propagate = False
    return logger


def get_logger(name: str) -> logging.Logger:
    """Child logger of the package logger (``name`` is usually ``__name__``)."""
    if not name.startswith(_ROOT):
        name = f"{_ROOT}.{name}"
    return logging.getLogger(name)
