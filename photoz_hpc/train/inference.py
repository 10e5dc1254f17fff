"""Run a photo-z network over an ``eval`` loader on every rank and gather the result once, in id order.

The eval sampler gives each rank a contiguous block of ids, padded so that every rank has the same
number of batches; padding rows (``valid`` False) are dropped after the gather, so every galaxy is
predicted exactly once whatever the number of ranks.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from photoz_hpc.comm.base import Comm


@torch.no_grad()
def predict(net: nn.Module, loader, comm: Comm, device: torch.device, autocast=None, with_probs: bool = False,
            channels_last: bool = False) -> dict[str, np.ndarray]:
    """``{'index', 'z_phot'[, 'probs']}`` for every sample of ``loader`` (same arrays on every rank).

    ``net`` maps images to bin logits and carries ``z_centres``; it is put in eval mode and restored.
    """
    was_training = net.training
    net.eval()
    centres = net.z_centres.to(device)
    rows_index, rows_valid, rows_z, rows_p = [], [], [], []
    loader.set_epoch(0)
    try:
        for batch in loader:
            x = batch["image"].to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast() if autocast is not None else torch.autocast(device.type, enabled=False):
                logits = net(x)
            probs = F.softmax(logits.float(), dim=1)
            rows_index.append(batch["index"].to(device))
            rows_valid.append(batch["valid"].to(device))
            rows_z.append(probs @ centres)
            if with_probs:
                rows_p.append(probs)
    finally:
        net.train(was_training)
    n_bins = centres.numel()
    local = {
        "index": torch.cat(rows_index) if rows_index else torch.zeros(0, dtype=torch.long, device=device),
        "valid": torch.cat(rows_valid) if rows_valid else torch.zeros(0, dtype=torch.bool, device=device),
        "z_phot": torch.cat(rows_z) if rows_z else torch.zeros(0, device=device),
    }
    if with_probs:
        local["probs"] = torch.cat(rows_p) if rows_p else torch.zeros(0, n_bins, device=device)
    out = {}
    for key, t in local.items():
        t = t.to(torch.uint8) if t.dtype == torch.bool else t
        out[key] = (comm.allgather(t) if comm.world > 1 else t).cpu().numpy()
    keep = out.pop("valid").astype(bool)
    order = np.argsort(out["index"][keep], kind="stable")
    return {k: v[keep][order] for k, v in out.items()}
