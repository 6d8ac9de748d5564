"""Pairwise preference losses for reward models (Bradley & Terry, 1952; Ouyang et al., 2022).

A reward model r is trained so that sigmoid(r(chosen) - r(rejected)) is the probability that
the chosen response is preferred. With hard labels the loss is -log sigmoid(r_c - r_r - margin)
(Llama 2's optional margin, Touvron et al. 2023); soft labels (the probability p that chosen is
preferred, e.g. from AI feedback) give the cross-entropy
-(p log sigmoid(d) + (1 - p) log sigmoid(-d)). Shapes: B pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    label: torch.Tensor | None = None,
    margin: float = 0.0,
) -> torch.Tensor:
    """Mean pairwise loss over (B,) rewards; label (B,) is P(chosen preferred), default 1."""
    d = r_chosen - r_rejected - margin
    if label is None:
        return -F.logsigmoid(d).mean()
    return -(label * F.logsigmoid(d) + (1 - label) * F.logsigmoid(-d)).mean()


def pairwise_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> float:
    """Share of pairs ranked the labelled way (ties count half)."""
    d = r_chosen - r_rejected
    return float(((d > 0).float() + 0.5 * (d == 0).float()).mean())
