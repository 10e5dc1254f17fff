"""MoCo v2 as one module (after facebookresearch/moco ``builder.py``), single- or multi-process.

Query encoder = ResNet + 2-layer MLP head; key encoder = its momentum copy. The queue and its pointer
are registered buffers (this rank's part, see ``queue.py``). ``forward`` updates the key encoder,
encodes keys (with shuffle-BN or SyncBN), computes the InfoNCE loss in fp32 and enqueues the keys.

Shuffle-BN permutes the key batch among a group of ranks: all of them (``bn_mode='shuffle'``, the
reference) or the ranks of this node only (``'shuffle-node'``: traffic independent of the world size).
A group of one rank (one process, or one rank per node) follows the reference's single-GPU recipe
(``bn_splits`` > 1): both encoders use ``SplitBatchNorm2d`` (training statistics per sub-batch of
B / bn_splits) and the key batch is permuted (seeded like the distributed shuffle) before encoding
and un-permuted after, so a query and its key are normalised with statistics of different samples.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from photoz_hpc.comm.base import Comm
from photoz_hpc.errors import ConfigError
from photoz_hpc.models.collectives import SharedHandle, sync_norm_factory
from photoz_hpc.models.dtypes import widen
from photoz_hpc.models.queue import (
    QUEUE_MODES,
    check_queue_size,
    enqueue,
    infonce_replicated,
    infonce_sharded,
    local_queue_size,
)
from photoz_hpc.models.resnet import build_encoder, convert_split_bn
from photoz_hpc.survey import Survey

BN_MODES = ("shuffle", "shuffle-node", "sync", "none")
SHUFFLE_MODES = ("shuffle", "shuffle-node")


def seeded_permutation(n: int, seed: int, device: torch.device) -> torch.Tensor:
    """``randperm(n)`` from a CPU generator seeded with ``seed`` (the same on every rank and device type,
    so no broadcast is needed and a resumed run reproduces it), on ``device``. A GPU gets it through
    pinned memory, non-blocking: no host synchronisation in the middle of the forward pass."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    if device.type == "cuda":
        return perm.pin_memory().to(device, non_blocking=True)
    return perm.to(device)


class MoCo(nn.Module):
    def __init__(
        self,
        encoder_q: nn.Module,
        feature_dim: int,
        dim: int = 128,
        queue_size: int = 65536,
        temperature: float = 0.2,
        queue_mode: str = "sharded",
        bn_mode: str = "shuffle",
        batch_size: int = 256,
        comm=None,
        hidden_dim: int | None = None,
        seed: int = 0,
        bn_splits: int = 8,
        split_bn_backward: str = "auto",
    ) -> None:
        super().__init__()
        if queue_mode not in QUEUE_MODES:
            raise ConfigError(f"moco.queue_mode '{queue_mode}' is not one of {list(QUEUE_MODES)}")
        if bn_mode not in BN_MODES:
            raise ConfigError(f"moco.bn_mode '{bn_mode}' is not one of {list(BN_MODES)}")
        self._comm = SharedHandle(comm or Comm())
        world = self.comm.world
        check_queue_size(queue_size, world, batch_size)
        check_node_groups(bn_mode, self.comm)
        self.dim, self.queue_size, self.temperature = dim, queue_size, temperature
        self.queue_mode, self.bn_mode, self.batch_size = queue_mode, bn_mode, batch_size
        # A shuffle group of one rank has no other ranks to shuffle keys across: split BN (both encoders)
        # + local shuffle.
        self.bn_splits = bn_splits if (bn_mode in SHUFFLE_MODES and self._shuffle_group()[1] == 1) else 1
        if self.bn_splits != 1:
            check_bn_splits(bn_splits, batch_size)
            encoder_q = convert_split_bn(encoder_q, bn_splits, split_bn_backward)
        hidden = hidden_dim or feature_dim
        head = nn.Sequential(nn.Linear(feature_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))
        self.encoder_q = nn.Sequential(encoder_q, head)
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for p in self.encoder_k.parameters():
            p.requires_grad_(False)
        k_local = local_queue_size(queue_size, world, queue_mode)
        # Random unit keys as in the reference; each rank's shard gets its own stream.
        g = torch.Generator().manual_seed(seed * 1000003 + (0 if queue_mode == "replicated" else self.comm.rank))
        self.register_buffer("queue", F.normalize(torch.randn(dim, k_local, generator=g), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @property
    def comm(self):
        return self._comm.obj

    @property
    def encoder(self) -> nn.Module:
        """The query-side ResNet trunk (what is exported for embeddings)."""
        return self.encoder_q[0]

    @torch.no_grad()
    def momentum_update(self, m: float) -> None:
        """theta_k <- m * theta_k + (1 - m) * theta_q (buffers such as BN stats are not copied)."""
        for pq, pk in zip(self.encoder_q.parameters(), self.encoder_k.parameters(), strict=True):
            pk.mul_(m).add_(pq.detach(), alpha=1.0 - m)

    def _shuffle_group(self) -> tuple[Callable[[torch.Tensor], torch.Tensor], int, int]:
        """(all-gather, size, our index) of the ranks the keys are shuffled among: this node's ranks for
        ``shuffle-node``, else all ranks."""
        c = self.comm
        if self.bn_mode == "shuffle-node":
            return c.allgather_node, c.node_size, c.node_rank
        return c.allgather, c.world, c.rank

    @torch.no_grad()
    def batch_shuffle(self, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather the shuffle group's batch, apply one permutation shared by its ranks, keep our slice.

        The permutation comes from ``seed`` (e.g. base seed + step), so no broadcast is needed and a
        resumed run reproduces it. Returns (our shuffled slice, inverse permutation).
        """
        gather, size, index = self._shuffle_group()
        x_all = gather(x.contiguous())
        perm = seeded_permutation(x_all.shape[0], seed, x.device)
        unperm = torch.argsort(perm)
        return x_all[perm.view(size, x.shape[0])[index]], unperm

    @torch.no_grad()
    def batch_unshuffle(self, y: torch.Tensor, unperm: torch.Tensor) -> torch.Tensor:
        """Undo ``batch_shuffle``: gather the group's outputs and take our original rows back."""
        gather, size, index = self._shuffle_group()
        y_all = gather(y.contiguous())
        return y_all[unperm.view(size, y.shape[0])[index]]

    @torch.no_grad()
    def encode_keys(self, im_k: torch.Tensor, shuffle_seed: int = 0) -> torch.Tensor:
        """L2-normalised keys, row i for input row i. Shuffle-BN: across the shuffle group's ranks, or in a
        group of one a local permutation from the same ``shuffle_seed`` feeding the split-BN key encoder."""
        if self.bn_mode in SHUFFLE_MODES and self._shuffle_group()[1] > 1:
            x, unperm = self.batch_shuffle(im_k, shuffle_seed)
            k = F.normalize(widen(self.encoder_k(x)), dim=1)
            return self.batch_unshuffle(k, unperm)
        if self.bn_splits > 1:
            perm = seeded_permutation(im_k.shape[0], shuffle_seed, im_k.device)
            k = F.normalize(widen(self.encoder_k(im_k[perm])), dim=1)
            return k[torch.argsort(perm)]
        return F.normalize(widen(self.encoder_k(im_k)), dim=1)

    def forward(
        self, im_q: torch.Tensor, im_k: torch.Tensor, momentum: float = 0.999, shuffle_seed: int = 0
    ) -> dict[str, torch.Tensor]:
        """Returns {'loss', 'acc'} (fp32); updates the key encoder before and the queue after."""
        if im_q.shape[0] != self.batch_size:
            raise ConfigError(f"MoCo was built for per-rank batches of {self.batch_size}, got {im_q.shape[0]}")
        q = self.encoder_q(im_q)
        with torch.no_grad():
            self.momentum_update(momentum)
            k = self.encode_keys(im_k, shuffle_seed)
        with torch.autocast(device_type=q.device.type, enabled=False):
            q = F.normalize(widen(q), dim=1)
            loss, acc = self.contrastive_loss(q, k)
        self.dequeue_and_enqueue(k)
        return {"loss": loss, "acc": acc.detach()}

    def contrastive_loss(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        queue = widen(self.queue.detach().clone())  # enqueue writes in place before backward
        if self.queue_mode == "sharded" and self.comm.world > 1:
            return infonce_sharded(q, k, queue, self.temperature, self.comm)
        return infonce_replicated(q, k, queue, self.temperature)

    @torch.no_grad()
    def dequeue_and_enqueue(self, k: torch.Tensor) -> None:
        if self.queue_mode == "replicated" and self.comm.world > 1:
            k = self.comm.allgather(k.contiguous())
        enqueue(self.queue, self.queue_ptr, k)


def check_node_groups(bn_mode: str, comm: Comm) -> None:
    """``shuffle-node`` needs the communicator's node groups (nodes as blocks of consecutive ranks)."""
    if bn_mode == "shuffle-node" and comm.node_error:
        raise ConfigError(
            f"moco.bn_mode 'shuffle-node' with dist.backend '{comm.name}': {comm.node_error}; or use "
            "moco.bn_mode 'shuffle' or 'sync'"
        )


def check_bn_splits(bn_splits: int, batch: int) -> None:
    """Split BN needs whole sub-batches: ``bn_splits`` must divide the per-rank batch."""
    if bn_splits < 1 or batch % bn_splits != 0:
        divisors = [d for d in range(1, min(batch, 64) + 1) if batch % d == 0]
        raise ConfigError(
            f"moco.bn_splits = {bn_splits} must divide the per-rank batch loader.batch_size = {batch} "
            f"(shuffle-BN on one process, or with shuffle-node and one rank per node, computes BatchNorm "
            f"statistics per sub-batch of batch / bn_splits); valid values: {divisors}"
        )


def build_moco(cfg, comm=None, survey: Survey | None = None) -> MoCo:
    """MoCo from a full ``Config`` (model, moco, loader.batch_size, seed) for data of ``survey`` (the stem's bands;
    None: the default survey, SDSS); BN layers follow moco.bn_mode (and moco.bn_splits for shuffle-BN in a shuffle
    group of one rank)."""
    norm = sync_norm_factory(comm if comm is not None else Comm()) if cfg.moco.bn_mode == "sync" else None
    encoder = build_encoder(cfg.model, norm, survey)
    return MoCo(
        encoder,
        encoder.feature_dim,
        dim=cfg.model.embed_dim,
        queue_size=cfg.moco.queue_size,
        temperature=cfg.moco.temperature,
        queue_mode=cfg.moco.queue_mode,
        bn_mode=cfg.moco.bn_mode,
        batch_size=cfg.loader.batch_size,
        comm=comm,
        hidden_dim=cfg.model.head_hidden_dim or None,
        seed=cfg.seed,
        bn_splits=cfg.moco.bn_splits,
        split_bn_backward=cfg.moco.split_bn_backward,
    )
