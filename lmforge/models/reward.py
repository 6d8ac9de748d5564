"""Reward model: a decoder or encoder trunk with a scalar head read at the last real token; and
PPO's value head, a scalar head on the policy's own trunk.

As in InstructGPT (Ouyang et al., 2022), the trunk starts from a trained language model (the
SFT model, typically) and a linear head maps the final hidden state of the last token of
(prompt + response) to one number. The chat template ends a response with `<|end_of_turn|>`,
so that is the token read. Batches are right-padded (one sequence per row) or packed (several per
row, with a block-diagonal mask and positions restarting per sequence, as SFT packs examples).

Optionally (`likelihood=True`, decoder trunks) the score also adds the trunk's own log-likelihood
of the reply, times a learned scale: r = head(h_last) + s * sum_t log p(y_t | x, y_<t). A small
trunk fine-tuned on a few thousand noisy pairs does not learn to check an answer from the state
of its last token, while its language-model head already rates how likely the answer is (the
"generative verifier" view of an LM); the head then learns the style terms on top. The term
needs the reply's tokens marked (`reply`).

Shape legend: B batch, T time, D width.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.models.decoder import Decoder
from lmforge.models.transformer import Transformer


def scalar_head(n_embd: int, init_std: float) -> nn.Linear:
    """A linear map of hidden states to one number, initialised small (outputs start near 0)."""
    head = nn.Linear(n_embd, 1)
    nn.init.normal_(head.weight, std=init_std / n_embd**0.5)
    nn.init.zeros_(head.bias)
    return head


class RewardModel(nn.Module):
    def __init__(self, trunk: Transformer, likelihood: bool = False):
        super().__init__()
        self.trunk = trunk
        self.cfg = trunk.cfg
        self.causal = isinstance(trunk, Decoder)  # else bidirectional (an encoder)
        if likelihood and not self.causal:
            raise ValueError("a likelihood term needs a decoder trunk")
        self.likelihood = likelihood
        # rewards start near 0, so the first Bradley-Terry gradients are balanced
        self.head = scalar_head(trunk.cfg.n_embd, trunk.cfg.init_std)
        if likelihood:  # weight of the reply's log-likelihood, in reward units per nat
            self.lik_scale = nn.Parameter(torch.ones(1))  # (1,): FSDP shards no 0-dim tensors

    def forward(
        self,
        idx: torch.Tensor,
        last: torch.Tensor,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        reply: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Rewards (N,) of the sequences in idx (B, T) whose final tokens sit at the flat
        indices `last` (N,) into B * T.

        Right-padded batch: one sequence per row, no mask needed for a causal trunk; a
        bidirectional trunk gets the padding keys hidden here. Packed batch (several sequences
        per row): give the restarting `positions` and the block-diagonal `mask`. With the
        likelihood term, `reply` (B, T) bool marks the reply's tokens (never a sequence's first).
        """
        B, T = idx.shape
        if mask is None and not self.causal:  # padded rows: hide the padding keys
            lengths = last - torch.arange(B, device=idx.device) * T + 1  # one per row
            valid = torch.arange(T, device=idx.device)[None, :] < lengths[:, None]  # (B, T)
            mask = valid[:, None, None, :]
        h = self.trunk.hidden_states(idx, positions=positions, mask=mask)  # (B, T, D)
        r = self.head(h.reshape(B * T, -1)[last]).squeeze(-1).float()
        if self.likelihood:
            if reply is None:
                raise ValueError("this reward model adds the reply's likelihood: give `reply`")
            r = r + self.lik_scale * self._reply_loglik(h, idx, reply, last, positions)
        return r

    def _reply_loglik(
        self,
        h: torch.Tensor,
        idx: torch.Tensor,
        reply: torch.Tensor,
        last: torch.Tensor,
        positions: torch.Tensor | None,
    ) -> torch.Tensor:
        """Summed log p of each sequence's reply tokens (N,). The LM head runs only where a
        reply token is predicted, by the position before it in the same sequence (a sequence's
        first token has none). Rows and packed sequences are contiguous in the flat B * T order,
        so a reply token belongs to the first sequence whose last token is at or after it."""
        B, T = idx.shape
        target = reply.clone()
        target[:, 0] = False  # position t - 1 predicts token t
        if positions is not None:  # packed: a sequence starts where its position is 0
            target &= positions > 0
        at = target.reshape(-1).nonzero().squeeze(1)  # flat index of each reply token
        logits = self.trunk.lm_head(h.reshape(B * T, -1)[at - 1]).float()
        lp = torch.log_softmax(logits, dim=-1).gather(1, idx.reshape(-1)[at, None]).squeeze(1)
        ends, order = last.sort()
        sums = lp.new_zeros(len(last)).index_add_(0, torch.searchsorted(ends, at), lp)
        out = torch.empty_like(sums)
        out[order] = sums
        return out

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
        self.head = scalar_head(n_embd, init_std)  # values start near 0

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., D) -> values (...)."""
        return self.head(h).squeeze(-1).float()
