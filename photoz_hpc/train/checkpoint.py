"""Atomic, self-validating checkpoints and ``resume: auto``.

Rank 0 writes ``<out_dir>/checkpoints/ckpt_<step>.pt`` through a temporary file + fsync + rename,
so a crash mid-write leaves the previous checkpoint intact. Each file carries a format tag and its
step; a file that fails to load (truncated, corrupt) is skipped with a warning.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from photoz_hpc.errors import PhotozError
from photoz_hpc.io_utils import atomic_open
from photoz_hpc.logs import get_logger

log = get_logger(__name__)

FORMAT = "photoz-hpc/moco-checkpoint/1"
_NAME = re.compile(r"^ckpt_(\d+)\.pt$")


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def save_checkpoint(directory: str | Path, step: int, state: dict[str, Any], keep: int = 3) -> Path:
    """Write ``state`` atomically as ``ckpt_<step>.pt``; keep the newest ``keep`` files."""
    directory = Path(directory)
    path = directory / f"ckpt_{step:09d}.pt"
    state = {"format": FORMAT, "step": step, **state}
    with atomic_open(path, "wb") as fh:
        torch.save(state, fh)
    for old in list_checkpoints(directory)[keep:]:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoint files, newest step first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and validate one checkpoint; raises ``PhotozError`` saying why it is unusable."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated zip, bad pickle, I/O error
        raise PhotozError(f"checkpoint {path} is unreadable or corrupt ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or "step" not in state:
        raise PhotozError(f"checkpoint {path} is not a photoz-hpc MoCo checkpoint")
    return state


def find_latest_valid(directory: str | Path) -> tuple[Path | None, dict[str, Any] | None]:
    """Newest checkpoint that loads; corrupt ones are skipped with a warning."""
    for path in list_checkpoints(directory):
        try:
            return path, load_checkpoint(path)
        except PhotozError as exc:
            log.warning("skipping %s", exc)
    return None, None
