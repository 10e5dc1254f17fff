"""Momentum-encoder coefficient schedule.

constant: m(t) = m0
cosine:   m(t) = 1 - (1 - m0) * (cos(pi * t / T) + 1) / 2     (BYOL-style; m0 at t=0, 1 at t=T)

The key encoder follows ``theta_k <- m * theta_k + (1 - m) * theta_q``; a schedule towards 1
freezes the keys late in training, which keeps the queue consistent as the lr decays.
"""

from __future__ import annotations

import math


def momentum_at(step: int, total_steps: int, base: float, schedule: str = "constant") -> float:
    """Momentum coefficient for ``step`` (0-based) of ``total_steps``."""
    if schedule == "constant" or total_steps <= 0:
        return base
    if schedule == "cosine":
        t = min(max(step, 0), total_steps) / total_steps
        return 1.0 - (1.0 - base) * (math.cos(math.pi * t) + 1.0) / 2.0
    raise ValueError(f"unknown momentum schedule '{schedule}' (use 'constant' or 'cosine')")
