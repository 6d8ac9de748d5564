"""Language-modelling losses: next-token cross-entropy and per-token log-probabilities.

Pure functions on logits; shared by pretraining, SFT and the RL stages.
Shape legend: B batch, T time, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits (B, T, V) against targets (B, T), skipping IGNORE_INDEX.

    Next-token prediction passes the block shifted by one; masked-token prediction passes the
    original ids at the hidden positions and IGNORE_INDEX elsewhere.

    Computed in float32 even under bf16 autocast: the log-softmax over a large vocabulary is
    where low precision hurts most.
    """
    V = logits.size(-1)
    return F.cross_entropy(
        logits.reshape(-1, V).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per position: (B, T, V), (B, T) -> (B, T), in float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
