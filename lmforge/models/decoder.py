"""Decoder-only transformer (GPT family, Llama-style blocks) for next-token prediction.

Architecture: token embedding -> n_layer pre-norm blocks (RMSNorm, rotary causal attention with
optional grouped-query heads, SwiGLU MLP) -> final RMSNorm -> LM head (optionally tied to the
embedding, Press & Wolf 2017). No biases and no learned positions, as in Llama (Touvron et al.,
2023), which keeps the weights mappable to Hugging Face `LlamaForCausalLM`.

The model only maps token ids to logits. Losses live in `objectives/`, sampling in
`generation/`, optimizer groups and checkpoints in `training/`.
"""

from __future__ import annotations

from lmforge.models.kv_cache import KVCache
from lmforge.models.transformer import Transformer, TransformerConfig


class Decoder(Transformer):
    def __init__(self, cfg: TransformerConfig):
        super().__init__(cfg, causal=True)

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        cfg = self.cfg
        p = self.tok_emb.weight
        return KVCache(
            cfg.n_layer,
            batch,
            cfg.kv_heads,
            max_len or cfg.max_seq_len,
            cfg.head_size,
            dtype=p.dtype,
            device=p.device,
        )
