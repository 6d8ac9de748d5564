"""Held-out language-modelling metrics: loss, perplexity, bits per byte, unigram baseline.

Bits per byte divides out the tokenizer, so models with different vocabularies compare
fairly: bpb = loss_nats / ln 2 * tokens / bytes.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from lmforge.data.packing import eval_blocks, gather_blocks
from lmforge.data.shards import TokenSplit
from lmforge.objectives.lm import next_token_loss
from lmforge.runtime import autocast


@torch.no_grad()
def held_out_metrics(
    model: torch.nn.Module,
    split: TokenSplit,
    block_size: int,
    batch_size: int,
    max_blocks: int,
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, float]:
    """Mean next-token loss over fixed held-out blocks, with perplexity and bits per byte."""
    was_training = model.training
    model.eval()
    starts = eval_blocks(split.tokens, block_size, max_blocks)
    total, count = 0.0, 0
    for i in range(0, len(starts), batch_size):
        x, y = gather_blocks(split.tokens, starts[i : i + batch_size], block_size)
        x, y = x.to(device), y.to(device)
        with autocast(device, dtype):
            logits = model(x)
        total += next_token_loss(logits, y).item() * y.numel()
        count += y.numel()
    model.train(was_training)
    loss = total / count
    return {
        "val_loss": loss,
        "val_ppl": math.exp(min(loss, 50.0)),
        "val_bpb": loss / math.log(2) * split.tokens_per_byte,
    }


def unigram_loss(train: np.ndarray, val: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of held-out tokens under add-one-smoothed train frequencies:
    the loss of a model that learned token frequencies and nothing else."""
    counts = np.bincount(np.asarray(train, dtype=np.int64), minlength=vocab_size) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[np.asarray(val[1:], dtype=np.int64)].mean())
