"""A preallocated key/value cache for incremental decoding.

Keys and values of every layer live in two tensors of shape (L, B, Hkv, S_max, hs). Each decode
step writes T new positions at `length` and attention reads [first, length + T) (first is 0
except in a cache made by `rows`). The cache is a plain container: the model decides what to
write, `generate` decides when to advance.

Row groups: a left-padded batch whose prompts differ much in length holds mostly padding in the
prefix of its short rows. `generate` sorts rows by prompt length and splits them into `groups`
(first row, end row, first key): rows first..end-1 have only padding before `first key`, so a
decode step's attention reads their keys from there on (one small attention per group instead of
one over every row's whole prefix).
"""

from __future__ import annotations

import torch

RowGroup = tuple[int, int, int]  # (first row, end row, first key position)


class KVCache:
    def __init__(
        self,
        n_layer: int,
        batch: int,
        n_kv_head: int,
        max_len: int,
        head_size: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        shape = (n_layer, batch, n_kv_head, max_len, head_size)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0  # positions filled and committed by `advance`
        self.first = 0  # attention reads keys from here (see `rows`)
        self.groups: list[RowGroup] = [(0, batch, 0)]

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, Hkv, T, hs) for `layer`; return the keys and values held so far
        (B, Hkv, S, hs), S = length + T - first."""
        T = k.size(2)
        end = self.length + T
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {self.max_len}")
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, self.first : end], self.v[layer, :, :, self.first : end]

    def advance(self, n: int) -> None:
        """Commit n positions after every layer has written them."""
        self.length += n

    def rows(self, first: int, end: int, start: int) -> KVCache:
        """A cache over rows first..end-1 that holds positions from `start` on, sharing this
        one's storage: a prefill of those rows alone (their prompts right-aligned in the batch,
        so nothing before `start` but padding) fills them in place."""
        part = KVCache.__new__(KVCache)
        part.k, part.v = self.k[:, first:end], self.v[:, first:end]
        part.max_len, part.length, part.first = self.max_len, start, start
        part.groups = [(0, end - first, start)]
        return part
