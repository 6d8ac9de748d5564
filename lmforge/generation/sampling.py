"""Choosing the next token from logits: greedy, temperature, top-k and nucleus (top-p).

Top-p follows Holtzman et al. (2020): keep the smallest set of tokens whose probability mass
reaches p. Shapes: B batch, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V); temperature 0 means greedy.

    `generator` may be one per row: each row then draws from its own stream, so its token does
    not depend on which other rows share the batch."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the mass before it already reaches p; the top token always stays.
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    if isinstance(generator, Sequence):
        rows = [
            torch.multinomial(p[None], 1, generator=g)
            for p, g in zip(probs, generator, strict=True)
        ]
        return torch.cat(rows).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
