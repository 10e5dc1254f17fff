"""The plain-PyTorch implementation: the fallback without DALI, the benchmark baseline, the test oracle.

It applies exactly the inputs ``source.py`` builds from the shared draws (no randomness of its own):
``grid_sample`` (bilinear, zero fill, ``align_corners=False``) with the fused destination-to-source
matrix, an exact integer slice where a matrix is a pure translation (so crops are bit-exact), then
``view * multiplier + sigma * noise`` per band, in the same order as the DALI pipeline.

Records arrive in the store's dtype (float32, or float16 from ``prepare --dtype float16``) and are cast to float32
after the read, on the delivery device (so a GPU receives half the bytes from a float16 store).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from photoz_hpc.augment.base import LoaderBase, to_device
from photoz_hpc.augment.source import BatchSource, SourceBatch


def warp(images: torch.Tensor, matrix: torch.Tensor, size: int, host_matrix: torch.Tensor | None = None) -> torch.Tensor:
    """Warp (B, C, H, W) images with destination-to-source matrices (B, 2, 3) to (B, C, size, size).
    ``host_matrix``: the same matrices on the host (the loader has them there; default: ``matrix`` read back). Which
    rows are exact integer translations, and their offsets, are decided on the host, so a GPU warp reads nothing
    back from the device (``.any()``, ``nonzero``, boolean masks: each a stream sync)."""
    b, c, h, w = images.shape
    host = (matrix if host_matrix is None else host_matrix).cpu()
    out = images.new_empty((b, c, size, size))
    shift = host[:, :, 2]
    translate = ((host[:, :, :2] == torch.eye(2, dtype=host.dtype)).all(dim=(1, 2)) & (shift == shift.round()).all(dim=1))
    offsets = shift.to(torch.int64).tolist()
    rest = []
    for i, exact in enumerate(translate.tolist()):
        if exact:
            x0, y0 = offsets[i]
            window = images[i, :, max(y0, 0) : y0 + size, max(x0, 0) : x0 + size]
            if window.shape[1:] == (size, size):
                out[i] = window
                continue
        rest.append(i)  # not a translation, or one partly outside the image: the general path below
    if not rest:
        return out
    index = None if len(rest) == b else to_device(torch.tensor(rest, dtype=torch.int64), images.device)
    sub = images if index is None else images.index_select(0, index)
    mats = matrix if index is None else matrix.index_select(0, index)
    coords = (torch.arange(size, dtype=images.dtype, device=images.device) + 0.5)
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")
    base = torch.stack([gx, gy, torch.ones_like(gx)], dim=-1)  # (S, S, 3) pixel centres
    src = torch.einsum("yxk,bik->byxi", base, mats.to(images.dtype))  # (b, S, S, 2) in pixels
    grid = torch.stack([src[..., 0] * (2.0 / w), src[..., 1] * (2.0 / h)], dim=-1) - 1.0
    warped = F.grid_sample(sub, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return warped if index is None else out.index_copy_(0, index, warped)


def apply_view(
    images: torch.Tensor, matrix: torch.Tensor, mult: torch.Tensor, size: int,
    sigma: torch.Tensor | None = None, noise: torch.Tensor | None = None, host_matrix: torch.Tensor | None = None,
) -> torch.Tensor:
    """One view: warp, per-band multiplier (B, C), then ``+ sigma (B, C) * noise (B, S, S, C)``."""
    out = warp(images, matrix, size, host_matrix) * mult[:, :, None, None]
    if sigma is not None:
        out = out + noise.permute(0, 3, 1, 2) * sigma[:, :, None, None]
    return out


def _raw(source_batch: SourceBatch) -> dict:
    """A SourceBatch as tensors (what DataLoader workers hand to the main process)."""
    views = []
    for v in source_batch.views:
        view = {"matrix": torch.from_numpy(v.matrix), "mult": torch.from_numpy(np.ascontiguousarray(v.mult[:, 0, 0, :]))}
        if v.sigma is not None:
            view["sigma"] = torch.from_numpy(np.ascontiguousarray(v.sigma[:, 0, 0, :]))
            view["noise"] = torch.from_numpy(np.stack(v.noise))
        views.append(view)
    images = torch.from_numpy(np.stack(source_batch.images))
    return {"images": images, "views": views, "source_batch": _labels_only(source_batch)}


def _labels_only(source_batch: SourceBatch) -> SourceBatch:
    return SourceBatch(index=source_batch.index, valid=source_batch.valid, images=[], views=[], labels=source_batch.labels)


def augment_raw(raw: dict, size: int, device: torch.device) -> list[torch.Tensor]:
    """Apply every view of a raw batch on ``device``; images move there first (GPU path), in the store's dtype, and
    become float32 there (float32 records: no copy)."""
    images = raw["images"].to(device, non_blocking=True).to(torch.float32).permute(0, 3, 1, 2)
    outs = []
    for host in raw["views"]:
        v = {k: t.to(device, non_blocking=True) for k, t in host.items()}
        outs.append(apply_view(images, v["matrix"], v["mult"], size, v.get("sigma"), v.get("noise"), host["matrix"]))
    return outs


def augment_batch(source_batch: SourceBatch, size: int, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """The oracle: the reference output of one SourceBatch."""
    return augment_raw(_raw(source_batch), size, torch.device(device))


class _Batches(torch.utils.data.Dataset):
    """Map-style dataset whose item k is raw batch k of the source's current epoch."""

    def __init__(self, source: BatchSource) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, k: int) -> dict:
        return _raw(self.source.batch(k))


def _ignore_sigint(worker_id: int) -> None:
    """Workers leave Ctrl-C to the main process (a training run's first Ctrl-C stops it after a checkpoint,
    which needs its workers; the terminal sends SIGINT to the whole process group)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


class ReferenceLoader(LoaderBase):
    """DataLoader over the store (workers read and draw; the main process augments on the device)."""

    backend = "reference"

    def __init__(self, source: BatchSource, device: str, num_workers: int = 0, prefetch: int = 2) -> None:
        super().__init__(source, device)
        self.num_workers, self.prefetch = num_workers, prefetch

    def _iterate(self, start: int) -> Iterator[dict[str, torch.Tensor]]:
        extra = {"prefetch_factor": self.prefetch, "worker_init_fn": _ignore_sigint} if self.num_workers else {}
        loader = torch.utils.data.DataLoader(
            _Batches(self.source), batch_size=None, sampler=range(start, len(self.source)),
            num_workers=self.num_workers, pin_memory=self.device == "gpu", collate_fn=lambda x: x, **extra,
        )
        for raw in loader:
            yield self.make_batch(raw["source_batch"], augment_raw(raw, self.source.spec.crop, self.torch_device))
