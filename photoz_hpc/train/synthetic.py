"""A loader with the ``build_loader`` contract that makes random view pairs: for unit tests and
for benchmarking the training step without I/O (no dataset needed)."""

from __future__ import annotations

import torch

from photoz_hpc.constants import N_BANDS


class SyntheticPairLoader:
    """Deterministic in (seed, epoch, step, rank); state is (epoch, position) for exact resume."""

    def __init__(self, n_samples: int, batch_size: int, crop_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0) -> None:
        self.batch, self.size, self.rank, self.world, self.seed = batch_size, crop_size, rank, world_size, seed
        self.steps = max(1, n_samples // (batch_size * world_size))
        self.epoch, self.position = 0, 0

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, sd: dict) -> None:
        self.epoch, self.position = int(sd["epoch"]), int(sd["position"])

    def __iter__(self):
        while self.position < self.steps:
            g = torch.Generator().manual_seed(((self.seed * 7919 + self.epoch) * 104729 + self.position) * 131 + self.rank)
            base = torch.randn(self.batch, N_BANDS, self.size, self.size, generator=g)
            v1 = base + 0.3 * torch.randn(base.shape, generator=g)
            v2 = base.flip(-1) + 0.3 * torch.randn(base.shape, generator=g)
            idx = torch.arange(self.batch) + (self.position * self.world + self.rank) * self.batch
            self.position += 1
            yield {"view1": v1, "view2": v2, "index": idx}
