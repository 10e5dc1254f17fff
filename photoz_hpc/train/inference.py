"""Run a photo-z network over an ``eval`` loader on every rank and gather the result once, in id order.

The eval sampler gives each rank a contiguous block of ids, padded so that every rank has the same
number of batches; padding rows (``valid`` False) are dropped after the gather, so every galaxy is
predicted exactly once whatever the number of ranks.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from photoz_hpc.comm.base import Comm
from photoz_hpc.errors import PhotozError

MAX_TTA = 4  # the four exact 90-degree rotations


def batch_log_probs(net, x, tta: int = 1, autocast=None, channels_last: bool = False):
    """(B, n_bins) float32 log of the pdf averaged over ``tta`` 90-degree rotations of ``x`` (B, C, S, S):
    log mean_r softmax(net(rot90(x, r))), computed by logsumexp so no tail underflows. Cost: ``tta`` forwards.
    ``autocast``: the precision's context factory (None: fp32)."""
    if not 1 <= tta <= MAX_TTA:
        raise PhotozError(f"--tta {tta}: test-time augmentation averages 1 to {MAX_TTA} exact 90-degree rotations")
    outs = []
    with torch.no_grad():
        for r in range(tta):
            xr = torch.rot90(x, r, dims=(2, 3)) if r else x
            if channels_last:
                xr = xr.contiguous(memory_format=torch.channels_last)
            with autocast() if autocast is not None else torch.autocast(x.device.type, enabled=False):
                logits = net(xr)
            outs.append(torch.log_softmax(logits.float(), dim=1))
        if tta == 1:
            return outs[0]
        return torch.logsumexp(torch.stack(outs), dim=0) - math.log(tta)


@torch.no_grad()
def predict(net: nn.Module, loader, comm: Comm, device: torch.device, autocast=None, with_probs: bool = False,
            channels_last: bool = False, tta: int = 1, with_log_probs: bool = False) -> dict[str, np.ndarray]:
    """``{'index', 'z_phot'[, 'probs'][, 'log_probs']}`` for every sample of ``loader`` (same arrays on every
    rank); the pdfs are averaged over ``tta`` rotations (``batch_log_probs``).

    ``net`` maps images to bin logits and carries ``z_centres``; it is put in eval mode and restored.
    """
    was_training = net.training
    net.eval()
    centres = net.z_centres.to(device)
    rows: dict[str, list[torch.Tensor]] = {"index": [], "valid": [], "z_phot": []}
    if with_probs:
        rows["probs"] = []
    if with_log_probs:
        rows["log_probs"] = []
    loader.set_epoch(0)
    try:
        for batch in loader:
            log_p = batch_log_probs(net, batch["image"].to(device, non_blocking=True), tta, autocast, channels_last)
            probs = log_p.exp()
            rows["index"].append(batch["index"])  # host tensors (loaders keep them there): moved once, below
            rows["valid"].append(batch["valid"])
            rows["z_phot"].append(probs @ centres)
            if with_probs:
                rows["probs"].append(probs)
            if with_log_probs:
                rows["log_probs"].append(log_p)
    finally:
        net.train(was_training)
    n_bins = centres.numel()
    empty = {"index": torch.zeros(0, dtype=torch.long, device=device),
             "valid": torch.zeros(0, dtype=torch.bool, device=device), "z_phot": torch.zeros(0, device=device),
             "probs": torch.zeros(0, n_bins, device=device), "log_probs": torch.zeros(0, n_bins, device=device)}
    local = {key: (torch.cat(parts) if parts else empty[key]).to(device) for key, parts in rows.items()}
    out = {}
    for key, t in local.items():
        t = t.to(torch.uint8) if t.dtype == torch.bool else t
        out[key] = (comm.allgather(t) if comm.world > 1 else t).cpu().numpy()
    keep = out.pop("valid").astype(bool)
    order = np.argsort(out["index"][keep], kind="stable")
    return {k: v[keep][order] for k, v in out.items()}
