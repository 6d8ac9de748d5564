"""Packed blocks for next-token prediction, addressed by sample index so resume is exact.

The token stream (documents separated by end-of-text) is cut into non-overlapping blocks of
block_size + 1 tokens. Each epoch shifts the cut by a seeded offset (so a model does not always
see the same boundaries) and visits the blocks in a seeded permutation, covering the data once.
Sample k of the whole run is a pure function of (seed, k): the "data position" a checkpoint
needs is just the step, and any rank can compute its share without coordination.
"""

from __future__ import annotations

import numpy as np
import torch

from lmforge.errors import UserError


class BlockSampler:
    def __init__(self, tokens: np.ndarray, block_size: int, seed: int):
        self.tokens = tokens
        self.block_size = block_size
        self.seed = seed
        # Leave room for the largest epoch offset (block_size - 1) plus the shifted target.
        self.n_blocks = (len(tokens) - block_size) // block_size
        if self.n_blocks < 1:
            raise UserError(
                f"training split has {len(tokens)} tokens: too few for one block of "
                f"block_size={block_size} (+1); use more text or a smaller train.block_size"
            )
        self._epoch = -1
        self._perm = np.empty(0, dtype=np.int64)
        self._offset = 0

    def _set_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = rng.permutation(self.n_blocks)
            self._offset = int(rng.integers(self.block_size)) if epoch > 0 else 0
            self._epoch = epoch

    def batch(self, start: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples start .. start+size-1 as inputs and targets, each (size, block_size)."""
        starts = np.empty(size, dtype=np.int64)
        for i in range(size):
            epoch, j = divmod(start + i, self.n_blocks)
            self._set_epoch(epoch)
            starts[i] = self._offset + self._perm[j] * self.block_size
        return gather_blocks(self.tokens, starts, self.block_size)


def gather_blocks(
    tokens: np.ndarray, starts: np.ndarray, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    idx = starts[:, None] + np.arange(block_size + 1)  # (B, T+1)
    chunk = torch.from_numpy(tokens[idx].astype(np.int64))
    return chunk[:, :-1], chunk[:, 1:]


def eval_blocks(tokens: np.ndarray, block_size: int, max_blocks: int) -> np.ndarray:
    """Start offsets of up to `max_blocks` non-overlapping held-out blocks, spread evenly."""
    n = (len(tokens) - 1) // block_size
    if n < 1:
        raise UserError(
            f"validation split has {len(tokens)} tokens: too few for one block of "
            f"block_size={block_size} (+1); hold out more text"
        )
    picks = np.linspace(0, n - 1, num=min(n, max_blocks)).round().astype(np.int64)
    return np.unique(picks) * block_size
