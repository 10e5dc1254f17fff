"""SGD / LARS and the learning-rate schedule (linear scaling, linear warm-up, cosine decay).

lr(step) = lr * B_global / batch_ref * w(step) * c(step), with
w = (step + 1) / warmup_steps during warm-up (else 1) and
c = (1 + cos(pi * (step - warmup_steps) / (total - warmup_steps))) / 2 for the cosine schedule, or
c = gamma ** (number of ``milestones`` epochs passed) for the step schedule (fine-tuning).
A parameter group's ``lr_scale`` (e.g. the fine-tuned trunk's 0.1) multiplies its lr.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from photoz_hpc.errors import ConfigError
from photoz_hpc.logs import get_logger

log = get_logger(__name__)


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratio eta * ||w|| / ||g + wd w|| (You et al. 2017).

    Biases and norm parameters (``lars_exclude`` groups) get neither weight decay nor adaptation,
    as usual for large-batch self-supervised training.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if not group["lars_exclude"]:
                    g = g.add(p, alpha=group["weight_decay"])
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                    trust = torch.where((w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm, torch.ones_like(w_norm))
                    g = g.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(g).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(g)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def build_optimizer(model: nn.Module | list[dict], optim_cfg) -> torch.optim.Optimizer:
    """Optimiser over ``model``'s trainable parameters, or over parameter groups ``[{'params', 'lr_scale'}]``
    (SGD only; the lr is set each step by ``lr_at`` x the group's ``lr_scale``)."""
    if isinstance(model, list):
        if optim_cfg.name != "sgd" or optim_cfg.fused:
            raise ConfigError("parameter groups (fine-tuning) need optim.name=sgd and optim.fused=false")
        groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in model]
        groups = [g for g in groups if g["params"]]
        return torch.optim.SGD(groups, lr=optim_cfg.lr, momentum=optim_cfg.momentum, weight_decay=optim_cfg.weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    if optim_cfg.name == "lars":
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        groups = [{"params": decay}, {"params": no_decay, "lars_exclude": True, "weight_decay": 0.0}]
        return LARS(groups, lr=optim_cfg.lr, momentum=optim_cfg.momentum, weight_decay=optim_cfg.weight_decay,
                    eta=optim_cfg.lars_eta)
    if optim_cfg.fused:
        try:
            from apex.optimizers import FusedSGD  # optional, never required

            return FusedSGD(params, lr=optim_cfg.lr, momentum=optim_cfg.momentum, weight_decay=optim_cfg.weight_decay)
        except ImportError:
            log.warning("optim.fused: apex is not importable; using torch.optim.SGD")
    return torch.optim.SGD(params, lr=optim_cfg.lr, momentum=optim_cfg.momentum, weight_decay=optim_cfg.weight_decay)


def lr_at(step: int, total_steps: int, steps_per_epoch: int, global_batch: int, optim_cfg) -> float:
    base = optim_cfg.lr * global_batch / optim_cfg.batch_ref
    warm = int(round(optim_cfg.warmup_epochs * steps_per_epoch))
    if step < warm:
        return base * (step + 1) / warm
    if optim_cfg.schedule == "step":
        return base * optim_cfg.gamma ** sum(step >= round(m * steps_per_epoch) for m in optim_cfg.milestones)
    if optim_cfg.schedule == "cosine" and total_steps > warm:
        t = min(step - warm, total_steps - warm) / (total_steps - warm)
        return base * 0.5 * (1.0 + math.cos(math.pi * t))
    return base


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
