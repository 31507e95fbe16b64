"""XrayGPT's optimiser and learning-rate schedule (LAVIS's ``linear_warmup_cosine_lr``).

The learning rate is set before every iteration (micro-batch), as LAVIS's runner does: linear
warm-up from ``warmup_lr`` to ``init_lr`` over ``warmup_steps`` iterations, then a cosine from
``init_lr`` to ``min_lr`` over all ``max_epoch * iters_per_epoch`` iterations (counted from 0, so
the cosine picks up where it stands at the end of warm-up, as in LAVIS).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import TrainConfig


def learning_rate(iteration: int, iters_per_epoch: int, train: TrainConfig) -> float:
    """The learning rate of global iteration ``iteration`` (0-based)."""
    in_epoch = iteration % iters_per_epoch
    if iteration < train.warmup_steps:
        # LAVIS passes the step within the epoch here; equal to the global one while warm-up fits in epoch 0.
        progress = in_epoch / max(train.warmup_steps, 1)
        return min(train.init_lr, train.warmup_lr + (train.init_lr - train.warmup_lr) * progress)
    total = train.max_epoch * iters_per_epoch
    return (train.init_lr - train.min_lr) * 0.5 * (1.0 + math.cos(math.pi * iteration / total)) + train.min_lr


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def build_optimizer(named: dict[str, nn.Parameter], train: TrainConfig) -> torch.optim.AdamW:
    """AdamW (0.9, 0.999) with LAVIS's weight-decay rule: none for 1-d tensors, biases and norms."""
    decay, no_decay = [], []
    for name in sorted(named):
        param = named[name]
        skip = param.ndim < 2 or "bias" in name or "ln" in name or "bn" in name
        (no_decay if skip else decay).append(param)
    groups = [{"params": decay, "weight_decay": train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=train.init_lr, betas=(0.9, 0.999))
