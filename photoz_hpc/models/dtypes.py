"""Accumulation precision in one place: fp16/bf16 activations are widened to fp32 for sums, normalisation
and the loss; fp32 and fp64 keep their own precision. An fp64 run (the tests' exact two-rank equivalence)
must not be truncated to fp32 midway, or its reduction-order noise would be fp32's again."""

from __future__ import annotations

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums over ``dtype`` values run in: fp32 for fp16/bf16, the dtype itself otherwise."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def widen(t: torch.Tensor) -> torch.Tensor:
    """``t`` in its accumulation dtype (a copy only for fp16/bf16)."""
    return t.float() if t.dtype in LOW_PRECISION else t
