"""Differentiable collectives and a communicator-backed SyncBatchNorm.

They take any object with the small communication interface of ``photoz_hpc.comm.base.Comm``
(``rank``, ``world``, ``allreduce``, ``allgather``), so the same autograd code runs serially,
under torch.distributed and under Horovod.
"""

from __future__ import annotations

import torch
from torch import nn

from photoz_hpc.models.dtypes import widen


class _AllGatherGrad(torch.autograd.Function):
    """Concatenate every rank's (B, ...) tensor; backward sums the gradient over ranks, keeps our rows.

    Every rank's loss may depend on every rank's rows (that is the point of gathering queries),
    so the gradient of our rows is the sum of all ranks' gradients for them.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm) -> torch.Tensor:
        ctx.comm, ctx.n = comm, x.shape[0]
        return comm.allgather(x.contiguous())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = ctx.comm.allreduce(grad.contiguous(), "sum")
        start = ctx.comm.rank * ctx.n
        return grad[start : start + ctx.n], None


class _AllReduceSumGrad(torch.autograd.Function):
    """y = sum_r x_r on every rank; since every rank's loss uses y, dL/dx_r = sum_r dL_r/dy."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm) -> torch.Tensor:
        ctx.comm = comm
        return comm.allreduce(x.contiguous(), "sum")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.comm.allreduce(grad.contiguous(), "sum"), None


def all_gather_grad(x: torch.Tensor, comm) -> torch.Tensor:
    if comm.world == 1:
        return x
    return _AllGatherGrad.apply(x, comm)


def all_reduce_sum_grad(x: torch.Tensor, comm) -> torch.Tensor:
    if comm.world == 1:
        return x
    return _AllReduceSumGrad.apply(x, comm)


class SharedHandle:
    """Holds the communicator so ``copy.deepcopy`` (building the key encoder) shares, not copies, it."""

    def __init__(self, obj) -> None:
        self.obj = obj

    def __deepcopy__(self, memo) -> SharedHandle:
        return self


class CommSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are taken over the global batch of all ranks.

    Works with any backend (torch's SyncBatchNorm needs GPUs and torch.distributed). Sums of x and
    x^2 are all-reduced in fp32 with a differentiable all-reduce, so gradients match a single
    process holding the whole batch. With one rank it is exactly a (single-pass) BatchNorm.
    """

    def __init__(self, num_features: int, comm=None, **kw) -> None:
        super().__init__(num_features, **kw)
        self._comm = SharedHandle(comm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        comm = self._comm.obj
        xf = widen(x)
        # the element count is filled in on the device (no host list copied to it: no sync per layer)
        n_local = xf.new_full((1,), float(x.shape[0] * x.shape[2] * x.shape[3]))
        stats = torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)), n_local])
        if comm is not None and comm.world > 1:
            stats = all_reduce_sum_grad(stats, comm)
        c = self.num_features
        count = stats[2 * c].detach()
        mean = stats[:c] / count
        var = (stats[c : 2 * c] / count - mean * mean).clamp_min(0.0)
        with torch.no_grad():
            if self.track_running_stats and self.running_mean is not None:
                self.num_batches_tracked.add_(1)
                mom = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (count / (count - 1).clamp_min(1.0))
                self.running_mean.mul_(1 - mom).add_(mom * mean)
                self.running_var.mul_(1 - mom).add_(mom * unbiased)
        inv = torch.rsqrt(var + self.eps)
        y = (xf - mean[None, :, None, None]) * inv[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def sync_norm_factory(comm):
    """A ``norm(num_features)`` factory for ``ResNet`` that builds ``CommSyncBatchNorm`` layers."""

    def make(num_features: int) -> nn.Module:
        return CommSyncBatchNorm(num_features, comm=comm)

    return make
