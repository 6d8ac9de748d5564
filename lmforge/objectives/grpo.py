"""Group-relative advantages (GRPO, Shao et al. 2024, DeepSeekMath).

G responses are sampled per prompt; each response's advantage is its reward standardised
within its group, so no critic is needed. The policy loss is PPO's clipped surrogate applied
at every token with that advantage (see `objectives/rl.py`), plus an optional k3 KL term.
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """(P, G) rewards -> (P, G) advantages: minus the group mean, over the group's standard
    deviation if `scale` (a group whose rewards are all equal gets zero advantage)."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale:
        return centred
    return centred / (rewards.std(dim=1, keepdim=True) + eps)
