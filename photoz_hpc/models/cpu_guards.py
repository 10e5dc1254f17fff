"""A defect of torch's CPU kernels that a model configuration can walk into, refused before training starts.

oneDNN's AVX2 kernel for 1x1 convolutions (torch 2.13 CPU wheel, on CPUs without AVX-512 such as many AMD
EPYC) corrupts the heap in the backward of a channels_last 1x1 convolution of stride > 1 with 2 to 7 input
channels: glibc aborts the process ("corrupted size vs. prev_size", "double free or corruption") or it spins,
whenever the damage is noticed, often in a later, unrelated step. With AVX-512 kernels, or with oneDNN held to
AVX (``ONEDNN_MAX_CPU_ISA=AVX``), or in NCHW, it does not happen, which is why it showed on some machines only.
A ResNet narrower than 8 (``model.width`` < 8) has such a convolution (its first downsampling shortcut). The
check does not depend on the CPU, so a configuration behaves the same on every machine.
"""

from __future__ import annotations

import torch
from torch import nn

from photoz_hpc.errors import ConfigError


def corrupting_convolutions(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """The convolutions whose channels_last CPU backward hits the oneDNN AVX2 defect."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and max(m.stride) > 1 and 1 < m.in_channels < 8]


def check_cpu_channels_last(model: nn.Module, device: torch.device, channels_last: bool) -> None:
    """``ConfigError`` for CPU training in channels_last of a model with a convolution that would corrupt memory."""
    if device.type != "cpu" or not channels_last:
        return
    found = corrupting_convolutions(model)
    if found:
        name, conv = found[0]
        raise ConfigError(
            f"model.channels_last on a CPU with a 1x1 stride-{max(conv.stride)} convolution of {conv.in_channels} input "
            f"channels ({name}): torch's oneDNN CPU kernel corrupts memory in its backward on CPUs without AVX-512. "
            "Use model.width >= 8 or model.channels_last=false (the CPU default, 'auto', is NCHW)")
