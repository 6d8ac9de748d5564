"""Encoder-decoder transformer (T5 family) for span corruption and other input -> output tasks.

Raffel et al. (2020) with the blocks of the other families: a bidirectional encoder over the
input, a causal decoder over the output whose blocks add cross-attention to the encoder's
output, one embedding shared by both sides and by the output head (tied by option). Rotary
phases are used inside each self-attention (T5 uses relative position biases); cross-attention
has none.

For decoding, the decoder's self-attention keys/values go into a `KVCache` as for the decoder
family, and each layer's cross-attention keys/values are computed once per input by
`memory_kv` and reused at every step.

Shape legend: B batch, S input length, T output length, D n_embd, V vocab_size.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from lmforge.models.kv_cache import KVCache
from lmforge.models.layers import Block, CrossBlock, RMSNorm, Rotary
from lmforge.models.transformer import TransformerConfig, init_parameters

MemoryKV = list[tuple[torch.Tensor, torch.Tensor]]  # per decoder layer: (B, Hkv, S, hs) each


class EncoderDecoder(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError("TransformerConfig.vocab_size must be set before building the model")
        if not cfg.is_default_architecture:
            raise ValueError("encoder-decoder models support only the default architecture options")
        self.cfg = cfg
        n_dec = cfg.n_decoder_layer or cfg.n_layer
        args = (cfg.n_embd, cfg.n_head, cfg.kv_heads, cfg.ff_width, cfg.dropout, cfg.norm_eps)
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.encoder = nn.ModuleList(Block(*args, causal=False) for _ in range(cfg.n_layer))
        self.enc_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.decoder = nn.ModuleList(CrossBlock(*args) for _ in range(n_dec))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.rotary = Rotary(cfg.head_size, cfg.max_seq_len, cfg.rope_theta)
        init_parameters(self, cfg.init_std, cfg.n_layer + n_dec)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_emb.weight.numel() if non_embedding else n

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder output (B, S, D) for input ids (B, S); src_mask (B, 1, 1, S) hides padding."""
        cos, sin = self.rotary(0, src.size(1))
        x = self.tok_emb(src)
        for block in self.encoder:
            x = block(x, cos, sin, src_mask)
        return self.enc_norm(x)

    def memory_kv(self, memory: torch.Tensor) -> MemoryKV:
        return [cast(CrossBlock, block).memory_kv(memory) for block in self.decoder]

    def decode(
        self,
        tgt: torch.Tensor,
        memory_kv: MemoryKV | torch.Tensor,
        *,
        memory_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V) for decoder input ids (B, T), continuing after the cache if given.
        `memory_kv`: every layer's from `memory_kv`, or the encoder output (B, S, D), from which
        each block computes its own (see `CrossBlock.forward`)."""
        start = cache.length if cache is not None else 0
        cos, sin = self.rotary(start, tgt.size(1))
        x = self.tok_emb(tgt)
        for i, block in enumerate(self.decoder):
            kv = memory_kv if isinstance(memory_kv, torch.Tensor) else memory_kv[i]
            x = block(x, cos, sin, kv, memory_mask, cache, i)
        if cache is not None:
            cache.advance(tgt.size(1))
        return self.lm_head(self.norm(x))

    def forward(
        self, src: torch.Tensor, tgt: torch.Tensor, src_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Teacher-forced logits (B, T, V): input ids (B, S), decoder input ids (B, T)."""
        return self.decode(tgt, self.encode(src, src_mask), memory_mask=src_mask)

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        cfg, p = self.cfg, self.tok_emb.weight
        return KVCache(
            len(self.decoder),
            batch,
            cfg.kv_heads,
            max_len or cfg.max_seq_len,
            cfg.head_size,
            dtype=p.dtype,
            device=p.device,
        )
