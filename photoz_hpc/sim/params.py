"""Loads the fitted survey-model parameters (``calibration.json``, package data written by calibrate.py)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from photoz_hpc.errors import ConfigError

CALIBRATION_PATH = Path(__file__).with_name("calibration.json")


@lru_cache(maxsize=4)
def load_calibration(path: str | None = None) -> dict:
    """Parsed calibration JSON; cached so every worker reads it once."""
    p = Path(path) if path else CALIBRATION_PATH
    if not p.is_file():
        raise ConfigError(f"{p}: synthetic-survey calibration missing; run python -m photoz_hpc.sim.calibrate")
    with p.open() as fh:
        cal = json.load(fh)
    for key in ("template_grid", "lf", "selection", "sed_model"):
        if key not in cal:
            raise ConfigError(f"{p}: calibration lacks key '{key}'")
    return cal
