"""Choosing the next token from logits: greedy, temperature, top-k and nucleus (top-p).

Top-p follows Holtzman et al. (2020): keep the smallest set of tokens whose probability mass
reaches p. Shapes: B batch, V vocabulary.

Drawing uses the inverse of each row's cumulative distribution: one uniform number per row
and a binary search, where `torch.multinomial` draws one exponential number per token (at a
2k vocabulary and batch 16 that was 0.7 ms a step, more than the rest of the sampling maths).
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
    if temperature != 1.0:
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
    return draw(logits, _uniforms(logits, generator))


def draw(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Ids (B,) drawn from softmax(logits (B, V)) by inverting the cumulative sum at u (B,),
    uniform in (0, 1].

    u is scaled by each row's summed probabilities (1 up to rounding), and the first id whose
    cumulative probability reaches u*total is taken: u > 0 and u*total <= total keep the
    answer in range, and a token of probability 0 (masked by top-k/top-p) adds nothing to the
    sum, so it can never be the first to reach it.
    """
    cdf = logits.softmax(dim=-1).cumsum(dim=-1)  # (B, V)
    target = u[:, None].to(cdf.dtype) * cdf[:, -1:]  # (B, 1)
    return torch.searchsorted(cdf, target).squeeze(-1)


def _uniforms(
    logits: torch.Tensor, generator: torch.Generator | Sequence[torch.Generator] | None
) -> torch.Tensor:
    """One number per row (B,) in (0, 1], from the row's own generator when given one each."""
    B, device = logits.size(0), logits.device
    if isinstance(generator, Sequence):
        if len(generator) != B:
            raise ValueError(f"{len(generator)} generators for {B} rows")
        u = torch.cat([torch.rand(1, device=device, generator=g) for g in generator])
    else:
        u = torch.rand(B, device=device, generator=generator)
    return 1.0 - u  # rand is in [0, 1)
