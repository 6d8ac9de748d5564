"""Optimizer and learning-rate schedule.

AdamW (Loshchilov & Hutter, 2019) with two parameter groups: matrices and embeddings decay,
vectors (norm gains, biases) do not, since shrinking a gain towards zero only hurts. The fused
kernel is used where the build has one (CUDA, and CPU since torch 2.4), else `foreach`.
`vector_lr` gives the vectors a learning rate of their own (as nanochat gives its scalars): RL
at a small lr barely moves the final norm's gain, which sets how sharp the policy samples.

Muon (Jordan et al., 2024, "Muon: an optimizer for hidden layers") is the alternative for the
hidden weight matrices: SGD momentum whose update is orthogonalised by a quintic Newton-Schulz
iteration, so every direction of a matrix moves at the same rate. It reaches a given loss in
fewer tokens than AdamW on small GPTs (the modded-nanoGPT speedruns). Embeddings, the LM head
and vectors stay on AdamW inside the same optimizer object, so checkpoints see one state dict.

Schedules are pure functions of the step, so resuming needs no scheduler state:
- cosine: linear warmup, then cosine decay to `min_lr_ratio * lr` (GPT-3, Brown et al., 2020);
- wsd: warmup-stable-decay: warmup, constant, then linear decay over the last `decay_frac`
  of training (Hu et al., 2024, "MiniCPM");
- constant: warmup, then constant.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from lmforge import distributed
from lmforge.config import check, opt
from lmforge.errors import UserError


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    name: Literal["adamw", "muon"] = opt(
        "adamw", "adamw, or muon for hidden matrices (AdamW for embeddings, head and vectors)"
    )
    lr: float = opt(1e-3, "peak learning rate (AdamW parameters)")
    vector_lr: float = opt(0.0, "peak learning rate of vectors (norm gains, biases); 0: lr")
    muon_lr: float = opt(0.02, "muon only: peak learning rate of the hidden matrices")
    muon_momentum: float = opt(0.95, "muon only: Nesterov momentum")
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
        check(self.vector_lr >= 0, "vector_lr", f"must be >= 0 (got {self.vector_lr})")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        check(0 < self.decay_frac <= 1, "decay_frac", "must be in (0, 1]")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(0 <= self.beta1 < 1, "beta1", "must be in [0, 1)")
        check(0 <= self.beta2 < 1, "beta2", "must be in [0, 1)")
        check(self.grad_clip >= 0, "grad_clip", "must be >= 0")

    @property
    def vectors_lr(self) -> float:
        """The vectors' peak learning rate: `vector_lr`, or `lr` when that is 0."""
        return self.vector_lr or self.lr


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, also: Sequence[tuple[nn.Module, float]] = ()
) -> torch.optim.Optimizer:
    """The optimizer of `model`; `also` adds (module, peak lr) pairs to the same AdamW, e.g. a
    PPO critic beside its policy, so one state dict holds both."""
    if cfg.name == "muon":
        if also:
            raise ValueError("muon: one model per optimizer")
        return _build_muon(model, cfg)
    groups: list[dict[str, Any]] = []
    lrs = [(model, cfg.lr, cfg.vectors_lr), *((m, lr, lr) for m, lr in also)]
    for module, lr, vector_lr in lrs:
        params = [p for p in module.parameters() if p.requires_grad]
        groups += [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay,
             "lr": lr, "base_lr": lr},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0,
             "lr": vector_lr, "base_lr": vector_lr},
        ]  # fmt: skip
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)  # type: ignore[arg-type]
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, foreach=True, **kwargs)  # type: ignore[arg-type]


def _build_muon(model: nn.Module, cfg: OptimConfig) -> Muon:
    if distributed.is_sharded(model):
        # its orthogonalisation needs each whole matrix, which no rank holds under FSDP
        raise UserError("optim.name=muon does not run with train.dist.strategy=fsdp; use adamw")
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    hidden: list[nn.Parameter] = []
    other: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_head = name.startswith("lm_head")
        (hidden if p.dim() == 2 and id(p) not in embeddings and not is_head else other).append(p)
    groups = [
        {"params": hidden, "use_muon": True, "lr": cfg.muon_lr, "base_lr": cfg.muon_lr,
         "weight_decay": 0.0},
        {"params": [p for p in other if p.dim() >= 2], "use_muon": False, "lr": cfg.lr,
         "base_lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"params": [p for p in other if p.dim() < 2], "use_muon": False,
         "lr": cfg.vectors_lr, "base_lr": cfg.vectors_lr, "weight_decay": 0.0},
    ]  # fmt: skip
    return Muon(groups, momentum=cfg.muon_momentum, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately orthogonalise a matrix (U S V^T -> U V^T) with the quintic iteration
    and coefficients (3.4445, -4.7750, 2.0315) of Jordan et al., in bf16 for speed."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.bfloat16()
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return (x.T if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for groups with `use_muon`, AdamW for the others; `lr` is set per group by the
    schedule as `base_lr * lr_scale` (see `set_lr`)."""

    def __init__(
        self,
        groups: list[dict[str, Any]],
        momentum: float,
        betas: tuple[float, float],
        eps: float,
    ):
        super().__init__(groups, dict(momentum=momentum, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if group["use_muon"]:
                    buf = state.setdefault("momentum_buffer", torch.zeros_like(p))
                    buf.lerp_(p.grad, 1 - group["momentum"])
                    g = p.grad.lerp(buf, group["momentum"])  # Nesterov
                    scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
                    p.add_(newton_schulz(g), alpha=-lr * scale)
                    continue
                if not state:
                    state["step"] = torch.zeros(())
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                b1, b2 = group["betas"]
                state["step"] += 1
                t = state["step"].item()
                state["exp_avg"].lerp_(p.grad, 1 - b1)
                state["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                denom = (state["exp_avg_sq"] / (1 - b2**t)).sqrt_().add_(group["eps"])
                p.mul_(1 - lr * wd)
                p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - b1**t))


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


def set_lr(optimizer: torch.optim.Optimizer, lr: float, peak: float) -> None:
    """Apply the schedule: every group runs at its own peak (`base_lr`) times lr / peak."""
    for group in optimizer.param_groups:
        group["lr"] = group.get("base_lr", peak) * lr / peak
