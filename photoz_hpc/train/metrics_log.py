"""Rank-0 metrics: a JSON-lines file (one object per logged step) and TensorBoard scalars."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from photoz_hpc.logs import get_logger

log = get_logger(__name__)


class MetricsLog:
    def __init__(self, out_dir: str | Path, enabled: bool = True, tensorboard: bool = True, prefix: str = "pretrain") -> None:
        self.enabled = enabled
        self.prefix = prefix
        self.path = Path(out_dir) / "metrics.jsonl"
        self._fh = None
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))
            except Exception as exc:  # tensorboard missing or broken: JSON lines still work
                log.warning("TensorBoard logging disabled: %s", exc)

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._fh.write(json.dumps({"step": step, **values}) + "\n")
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{self.prefix}/{key}", value, step)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
