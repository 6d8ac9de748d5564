"""Direct preference optimisation losses on sequence log-probabilities.

Inputs are summed log-probs of the chosen and rejected responses under the policy and the
frozen reference, each (B,). With h = (log pi(c) - log ref(c)) - (log pi(r) - log ref(r)):

    sigmoid (DPO, Rafailov et al. 2023):  -log sigmoid(beta * h)   (soft labels: cross-entropy)
    ipo     (IPO, Azar et al. 2023):      (h - 1 / (2 beta))^2

The implicit reward of a response is beta * (log pi - log ref).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def _sigmoid(h: torch.Tensor, beta: float, label: torch.Tensor) -> torch.Tensor:
    return -(label * F.logsigmoid(beta * h) + (1 - label) * F.logsigmoid(-beta * h))


def _ipo(h: torch.Tensor, beta: float, label: torch.Tensor) -> torch.Tensor:
    # A soft label p moves the target margin to (2p - 1) / (2 beta); p = 1 is the paper's.
    return (h - (2 * label - 1) / (2 * beta)) ** 2


DPO_LOSSES: dict[str, Callable[[torch.Tensor, float, torch.Tensor], torch.Tensor]] = {
    "sigmoid": _sigmoid,
    "ipo": _ipo,
}


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    kind: str = "sigmoid",
    label: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss, implicit reward of chosen (B,), of rejected (B,)); label is P(chosen
    preferred), 1 by default."""
    chosen = policy_chosen - ref_chosen
    rejected = policy_rejected - ref_rejected
    if label is None:
        label = torch.ones_like(chosen)
    loss = DPO_LOSSES[kind](chosen - rejected, beta, label).mean()
    return loss, beta * chosen.detach(), beta * rejected.detach()
