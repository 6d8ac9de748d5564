"""Optimizer and learning-rate schedule.

AdamW (Loshchilov & Hutter, 2019) with two parameter groups: matrices and embeddings decay,
vectors (norm gains, biases) do not, since shrinking a gain towards zero only hurts. The fused
kernel is used where the build has one (CUDA, and CPU since torch 2.4), else `foreach`.

Schedules are pure functions of the step, so resuming needs no scheduler state:
- cosine: linear warmup, then cosine decay to `min_lr_ratio * lr` (GPT-3, Brown et al., 2020);
- wsd: warmup-stable-decay: warmup, constant, then linear decay over the last `decay_frac`
  of training (Hu et al., 2024, "MiniCPM");
- constant: warmup, then constant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from lmforge.config import check, opt


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    lr: float = opt(1e-3, "peak learning rate")
    min_lr_ratio: float = opt(0.1, "final learning rate as a fraction of lr")
    schedule: Literal["cosine", "wsd", "constant"] = opt("cosine", "learning-rate schedule")
    warmup_steps: int = opt(100, "steps of linear warmup from 0 to lr")
    decay_frac: float = opt(0.2, "wsd only: fraction of steps spent decaying at the end")
    weight_decay: float = opt(0.1, "AdamW weight decay on matrices and embeddings")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    eps: float = opt(1e-8, "AdamW epsilon")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this; 0 disables")

    def __post_init__(self) -> None:
        check(self.lr > 0, "lr", f"must be > 0 (got {self.lr})")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        check(0 < self.decay_frac <= 1, "decay_frac", "must be in (0, 1]")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(0 <= self.beta1 < 1, "beta1", "must be in [0, 1)")
        check(0 <= self.beta2 < 1, "beta2", "must be in [0, 1)")
        check(self.grad_clip >= 0, "grad_clip", "must be >= 0")


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)  # type: ignore[arg-type]
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, foreach=True, **kwargs)  # type: ignore[arg-type]


def lr_at(step: int, max_steps: int, cfg: OptimConfig) -> float:
    """Learning rate for optimizer step `step` (0-based) of `max_steps`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":
        decay_start = max(cfg.warmup_steps, int(max_steps * (1 - cfg.decay_frac)))
        if step < decay_start:
            return cfg.lr
        frac = (step - decay_start) / max(1, max_steps - decay_start)
        return cfg.lr - (cfg.lr - floor) * min(1.0, frac)
    frac = (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps)
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * min(1.0, frac)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
