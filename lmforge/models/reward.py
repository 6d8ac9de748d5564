"""Reward model: a decoder or encoder trunk with a scalar head read at the last real token; and
PPO's value head, a scalar head on the policy's own trunk.

As in InstructGPT (Ouyang et al., 2022), the trunk starts from a trained language model (the
SFT model, typically) and a linear head maps the final hidden state of the last token of
(prompt + response) to one number. The chat template ends a response with `<|end_of_turn|>`,
so that is the token read. Batches are right-padded (one sequence per row) or packed (several per
row, with a block-diagonal mask and positions restarting per sequence, as SFT packs examples).

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

    def forward(
        self,
        idx: torch.Tensor,
        last: torch.Tensor,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Rewards (N,) of the sequences in idx (B, T) whose final tokens sit at the flat
        indices `last` (N,) into B * T.

        Right-padded batch: one sequence per row, no mask needed for a causal trunk; a
        bidirectional trunk gets the padding keys hidden here. Packed batch (several sequences
        per row): give the restarting `positions` and the block-diagonal `mask`.
        """
        B, T = idx.shape
        if mask is None and not self.causal:  # padded rows: hide the padding keys
            lengths = last - torch.arange(B, device=idx.device) * T + 1  # one per row
            valid = torch.arange(T, device=idx.device)[None, :] < lengths[:, None]  # (B, T)
            mask = valid[:, None, None, :]
        h = self.trunk.hidden_states(idx, positions=positions, mask=mask)  # (B, T, D)
        return self.head(h.reshape(B * T, -1)[last]).squeeze(-1).float()

    def values(
        self,
        idx: torch.Tensor,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The head at every position of idx (B, T) -> (B, T): PPO's critic, which estimates at
        each token the reward still to come. Right-padded rows, or packed ones with their
        `positions` and block-diagonal causal `mask`."""
        h = self.trunk.hidden_states(idx, positions=positions, mask=mask)  # (B, T, D)
        return self.head(h).squeeze(-1).float()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


class ValueHead(nn.Module):
    """PPO's critic sharing the policy's trunk: a linear map of the policy's final hidden states
    to a value per position, as in TRL and Huang et al. (2024). The policy's one forward gives
    log-probs and values, and the value loss trains the trunk too (weighted by value_coef)."""

    def __init__(self, n_embd: int, init_std: float):
        super().__init__()
        self.head = nn.Linear(n_embd, 1)
        nn.init.normal_(self.head.weight, std=init_std / n_embd**0.5)  # values start near 0
        nn.init.zeros_(self.head.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., D) -> values (...)."""
        return self.head(h).squeeze(-1).float()
