"""Held-out language-modelling metrics: loss, perplexity, bits per byte, unigram baseline.

Bits per byte divides out the tokenizer, so models with different vocabularies compare
fairly: bpb = loss_nats / ln 2 * tokens / bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from lmforge.data.packing import eval_blocks, gather_blocks
from lmforge.data.shards import TokenSplit
from lmforge.objectives.lm import IGNORE_INDEX, token_loss
from lmforge.runtime import Batch, autocast, call, to_device

BatchTransform = Callable[[torch.Tensor, torch.Tensor, int], tuple[Batch, torch.Tensor]]

# Sample indices for held-out batches: far from any training index, so a masked-token
# objective draws its held-out masks from a fixed stream that training never uses.
EVAL_SAMPLE_BASE = 1 << 48


@torch.no_grad()
def held_out_metrics(
    model: torch.nn.Module,
    split: TokenSplit,
    block_size: int,
    batch_size: int,
    max_blocks: int,
    device: torch.device,
    dtype: torch.dtype,
    transform: BatchTransform,
    next_token: bool = True,
) -> dict[str, float]:
    """Mean loss and token accuracy over fixed held-out blocks; for next-token prediction also
    perplexity and bits per byte. `transform` turns (inputs, shifted targets, sample index)
    into the objective's (inputs, targets), as in training."""
    was_training = model.training
    model.eval()
    starts = eval_blocks(split.tokens, block_size, max_blocks)
    total, correct, count = 0.0, 0, 0
    for i in range(0, len(starts), batch_size):
        x, y = gather_blocks(split.tokens, starts[i : i + batch_size], block_size)
        inputs, y = transform(x, y, EVAL_SAMPLE_BASE + i)
        inputs, y = to_device(inputs, device), y.to(device)
        with autocast(device, dtype):
            logits = call(model, inputs)
        n = int((y != IGNORE_INDEX).sum())
        total += token_loss(logits, y).item() * n
        correct += int(((logits.argmax(-1) == y) & (y != IGNORE_INDEX)).sum())
        count += n
    model.train(was_training)
    loss = total / max(count, 1)
    out = {"val_loss": loss, "val_acc": correct / max(count, 1)}
    if next_token:
        out["val_ppl"] = math.exp(min(loss, 50.0))
        out["val_bpb"] = loss / math.log(2) * split.tokens_per_byte
    return out


def unigram_accuracy(
    train: np.ndarray,
    split: TokenSplit,
    block_size: int,
    batch_size: int,
    max_blocks: int,
    transform: BatchTransform,
) -> float:
    """Held-out accuracy of always predicting the most frequent training token, on exactly the
    positions `held_out_metrics` scores: the bar a model must clear to have learned anything."""
    top = int(np.bincount(np.asarray(train, dtype=np.int64)).argmax())
    starts = eval_blocks(split.tokens, block_size, max_blocks)
    hits = count = 0
    for i in range(0, len(starts), batch_size):
        x, y = gather_blocks(split.tokens, starts[i : i + batch_size], block_size)
        _, y = transform(x, y, EVAL_SAMPLE_BASE + i)
        keep = y != IGNORE_INDEX
        hits += int((y[keep] == top).sum())
        count += int(keep.sum())
    return hits / max(count, 1)


def unigram_loss(train: np.ndarray, val: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of held-out tokens under add-one-smoothed train frequencies:
    the loss of a model that learned token frequencies and nothing else."""
    counts = np.bincount(np.asarray(train, dtype=np.int64), minlength=vocab_size) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[np.asarray(val[1:], dtype=np.int64)].mean())
