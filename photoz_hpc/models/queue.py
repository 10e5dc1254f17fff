"""The MoCo negative queue across ranks: layouts and the three contrastive-loss modes.

Modes (``moco.queue_mode``), for W ranks with per-rank batch B, queue size K, embedding dim d:

replicated  (reference MoCo) every rank holds all K keys. Keys are all-gathered (W*B*d floats per
            step) and every rank enqueues the same W*B keys. Memory K*d per rank.
sharded     every rank holds K/W keys and enqueues only its own B keys (no key all-gather). Queries
            are all-gathered instead (W*B*d floats, differentiable), each rank scores all W*B queries
            against its shard, and the softmax denominators are combined with a distributed
            log-sum-exp (an all-reduce of W*B maxima and of W*B partial sums; the backward pass
            all-reduces the W*B gradients of those sums and of the gathered queries). The loss and
            gradients equal the replicated loss over all K negatives (up to fp32 summation order).
            Memory K*d/W per rank.
local       every rank holds K/W keys and uses only its own shard as negatives (K/W negatives per
            query, no communication for the loss). Cheapest; a different (weaker) objective.

Layout: rank r's local slot j corresponds to column (j // B) * W*B + r*B + j % B of the replicated
queue, which is exactly where the replicated queue would have put that key; ``shard_queue`` and
``unshard_queue`` convert, so checkpoints and tests can move between modes and world sizes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from photoz_hpc.errors import ConfigError
from photoz_hpc.models.collectives import all_gather_grad, all_reduce_sum_grad

QUEUE_MODES = ("sharded", "local", "replicated")


def check_queue_size(queue_size: int, world: int, batch: int) -> None:
    """K must hold a whole number of global batches so that enqueueing never splits at the wrap."""
    step = world * batch
    if queue_size % step != 0:
        lo = max(step, queue_size - queue_size % step)
        raise ConfigError(
            f"moco.queue_size = {queue_size} must be divisible by world_size x per-rank batch = "
            f"{world} x {batch} = {step} (loader.batch_size is per rank); use e.g. {lo} or {lo + step}"
        )


def local_queue_size(queue_size: int, world: int, mode: str) -> int:
    return queue_size if mode == "replicated" else queue_size // world


def shard_queue(full: torch.Tensor, rank: int, world: int, batch: int) -> torch.Tensor:
    """Rank ``rank``'s (d, K/W) shard of a replicated (d, K) queue."""
    d, k = full.shape
    blocks = full.reshape(d, k // (world * batch), world, batch)
    return blocks[:, :, rank, :].reshape(d, k // world).clone()


def unshard_queue(shards: list[torch.Tensor], batch: int) -> torch.Tensor:
    """Inverse of ``shard_queue``: rebuild the replicated (d, K) queue from all ranks' shards."""
    world = len(shards)
    d, kl = shards[0].shape
    stacked = torch.stack([s.reshape(d, kl // batch, batch) for s in shards], dim=2)  # d, blocks, W, B
    return stacked.reshape(d, kl * world).clone()


def infonce_replicated(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float):
    """Reference MoCo InfoNCE (positives in column 0); returns (loss, top-1 accuracy)."""
    l_pos = (q * k).sum(1, keepdim=True)
    l_neg = q @ queue
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    loss = F.cross_entropy(logits, labels)
    acc = (logits.argmax(1) == 0).float().mean()
    return loss, acc


def infonce_sharded(q: torch.Tensor, k: torch.Tensor, shard: torch.Tensor, temperature: float, comm):
    """The replicated InfoNCE over all ranks' shards, via a distributed log-sum-exp.

    log Z_i = logaddexp(l_pos_i, M_i + log sum_r sum_j exp(l_ij^(r) - M_i)), M_i = max_r max_j l_ij^(r)
    (M is detached: log-sum-exp does not depend on it, so its gradient cancels exactly).
    """
    b = q.shape[0]
    q_all = all_gather_grad(q, comm)  # (W*B, d), gradients flow back from every shard
    l_neg = (q_all @ shard) / temperature  # (W*B, K/W)
    m = l_neg.detach().max(dim=1).values
    if comm.world > 1:
        m = comm.allreduce(m, "max")
    s = torch.exp(l_neg - m[:, None]).sum(dim=1)
    s = all_reduce_sum_grad(s, comm)
    start = comm.rank * b
    lse_neg = (m + torch.log(s))[start : start + b]
    l_pos = (q * k).sum(1) / temperature
    loss = (torch.logaddexp(l_pos, lse_neg) - l_pos).mean()
    acc = (l_pos > m[start : start + b]).float().mean()
    return loss, acc


@torch.no_grad()
def enqueue(queue: torch.Tensor, ptr: torch.Tensor, keys: torch.Tensor) -> None:
    """Write ``keys`` (n, d) at ``ptr`` and advance it modulo the queue length (n divides it).

    Sync-free: the write position stays on the device (no ``ptr.item()`` host round trip per step)."""
    n, kq = keys.shape[0], queue.shape[1]
    if kq % n != 0:
        raise ConfigError(f"queue of {kq} slots cannot take batches of {n} keys without splitting at the wrap")
    idx = ptr + torch.arange(n, dtype=ptr.dtype, device=ptr.device)
    queue.index_copy_(1, idx, keys.t().to(queue.dtype))
    ptr.add_(n).remainder_(kq)
