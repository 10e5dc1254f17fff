"""Mixed precision with torch.amp, and the one backward/step protocol (GradScaler x Horovod).

auto: bf16 autocast on GPUs that compute bf16 natively (compute capability >= 8: A100, H100, ...), fp16 +
GradScaler on older GPUs (V100, T4: their bf16 is emulated and slow), fp32 on CPU (CPU bf16 is slower on
most hosts; ask for it explicitly). fp16 uses a GradScaler (meant for GPUs; allowed on CPU). The MoCo loss,
logits and queue stay fp32 regardless (``MoCo.forward`` leaves autocast for them).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from photoz_hpc.errors import ConfigError
from photoz_hpc.logs import get_logger

log = get_logger(__name__)


@dataclass
class Precision:
    name: str  # fp32 | bf16 | fp16
    device_type: str
    scaler: torch.amp.GradScaler | None = None

    @property
    def dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)


def native_bf16_supported() -> bool:
    """Whether the current GPU computes bf16 natively. ``torch.cuda.is_bf16_supported()`` alone also
    counts emulated bf16 (V100, T4), which is several times slower than fp16 there."""
    if not torch.cuda.is_available():
        return False
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # an older torch without the argument: native from compute capability 8.0 (Ampere)
        return torch.cuda.get_device_capability()[0] >= 8


def resolve_precision(requested: str, device: torch.device) -> Precision:
    dev = device.type
    if requested == "auto":
        requested = "fp32" if dev != "cuda" else ("bf16" if native_bf16_supported() else "fp16")
    if requested == "fp16":
        if dev == "cpu":  # works (tests use it for the GradScaler protocol) but is slow
            log.warning("train.precision 'fp16' on CPU is slow; prefer 'bf16' or 'fp32' there")
        return Precision("fp16", dev, torch.amp.GradScaler(dev))
    if requested == "bf16" and dev == "cuda" and not native_bf16_supported():
        if not torch.cuda.is_bf16_supported():
            raise ConfigError("train.precision 'bf16' is not supported by this GPU; use 'fp16' or 'fp32'")
        log.warning("train.precision 'bf16': this GPU only emulates bf16 (slow); 'fp16' or 'auto' is faster")
    if requested not in ("fp32", "bf16"):
        raise ConfigError(f"train.precision '{requested}' is not one of ['auto', 'fp32', 'bf16', 'fp16']")
    return Precision(requested, dev)


def backward_and_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    precision: Precision,
    params: list[torch.nn.Parameter],
    grad_clip: float = 0.0,
    horovod: bool = False,
) -> None:
    """Backward, optional unscale + clip, step. With Horovod the gradients must be all-reduced
    (``synchronize``) before unscaling/clipping, and ``step`` must then skip its own synchronize."""
    scaler = precision.scaler
    if scaler is not None:
        scaler.scale(loss).backward()
    else:
        loss.backward()
    needs_sync = horovod and (scaler is not None or grad_clip > 0)
    if needs_sync:
        optimizer.synchronize()
    if scaler is not None:
        scaler.unscale_(optimizer)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    ctx = optimizer.skip_synchronize() if needs_sync else contextlib.nullcontext()
    with ctx:
        if scaler is not None:
            scaler.step(optimizer)
        else:
            optimizer.step()
    if scaler is not None:
        scaler.update()
