"""Reward model: a decoder or encoder trunk with a scalar head read at the last real token.

As in InstructGPT (Ouyang et al., 2022), the trunk starts from a trained language model (the
SFT model, typically) and a linear head maps the final hidden state of the last token of
(prompt + response) to one number. The chat template ends a response with `<|end_of_turn|>`,
so that is the token read. Batches are right-padded: for a causal trunk the real tokens never
see the padding; for a bidirectional one a key mask hides it.

Shape legend: B batch, T time, D width.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.models.decoder import Decoder
from lmforge.models.transformer import Transformer


class RewardModel(nn.Module):
    def __init__(self, trunk: Transformer):
        super().__init__()
        self.trunk = trunk
        self.cfg = trunk.cfg
        self.causal = isinstance(trunk, Decoder)  # else bidirectional (an encoder)
        self.head = nn.Linear(trunk.cfg.n_embd, 1)
        # Small init: rewards start near 0, so the first Bradley-Terry gradients are balanced.
        nn.init.normal_(self.head.weight, std=trunk.cfg.init_std / trunk.cfg.n_embd**0.5)
        nn.init.zeros_(self.head.bias)

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Rewards (B,) for right-padded ids (B, T) whose real lengths are `lengths` (B,)."""
        T = idx.size(1)
        mask = None
        if not self.causal:  # bidirectional: hide the padding keys
            valid = torch.arange(T, device=idx.device)[None, :] < lengths[:, None]  # (B, T)
            mask = valid[:, None, None, :]
        h = self.trunk.hidden_states(idx, mask=mask)  # (B, T, D)
        last = h[torch.arange(idx.size(0), device=idx.device), lengths - 1]  # (B, D)
        return self.head(last).squeeze(-1).float()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
