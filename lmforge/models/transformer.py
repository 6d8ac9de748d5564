"""What every model family shares: the transformer config and the trunk around the blocks.

A family (decoder, encoder) is this trunk with its attention direction and its extras (the
decoder's KV cache). The blocks themselves live in `layers.py`.

Shape legend: B batch, T time, D n_embd, V vocab_size, hs head size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from lmforge.config import check, opt
from lmforge.models.kv_cache import KVCache
from lmforge.models.layers import MLP, Block, Norm, Rotary, default_ff_width, make_norm


@dataclass(frozen=True, kw_only=True)
class TransformerConfig:
    vocab_size: int = opt(0, "vocabulary size; 0 takes it from the tokenizer")
    n_layer: int = opt(4, "number of transformer blocks (encoder-decoder: encoder blocks)")
    n_decoder_layer: int = opt(0, "encoder-decoder only: decoder blocks; 0 means n_layer")
    n_head: int = opt(4, "attention heads")
    n_kv_head: int = opt(0, "key/value heads for grouped-query attention; 0 means n_head")
    n_embd: int = opt(128, "model width D (must be divisible by n_head)")
    d_ff: int = opt(0, "SwiGLU hidden width; 0 means 8/3 * n_embd rounded up to 32")
    max_seq_len: int = opt(256, "longest context the model supports (rotary table size)")
    rope_theta: float = opt(10000.0, "rotary embedding base")
    tie_embeddings: bool = opt(True, "share the input embedding with the LM head")
    dropout: float = opt(0.0, "dropout on attention and residual branches")
    norm_eps: float = opt(1e-5, "RMSNorm epsilon")
    init_std: float = opt(0.02, "standard deviation of the normal weight init")
    # Architecture variants, for checkpoints imported from Hugging Face (models/hf.py): GPT-2
    # is layernorm + gelu + learned + bias + qkv_bias; Qwen2 is the default plus qkv_bias.
    norm: Norm = opt("rmsnorm", "rmsnorm (Llama) or layernorm (GPT-2)")
    mlp: MLP = opt("swiglu", "swiglu (Llama) or gelu (GPT-2, tanh approximation)")
    positions: Literal["rope", "learned"] = opt(
        "rope", "rotary positions (Llama) or a learned position embedding (GPT-2)"
    )
    qkv_bias: bool = opt(False, "biases on the q/k/v projections (Qwen2, GPT-2)")
    bias: bool = opt(False, "biases on the attention output and MLP projections (GPT-2)")

    def __post_init__(self) -> None:
        check(self.vocab_size >= 0, "vocab_size", f"must be >= 0 (got {self.vocab_size})")
        check(self.n_layer >= 1, "n_layer", f"must be >= 1 (got {self.n_layer})")
        check(self.n_decoder_layer >= 0, "n_decoder_layer", "must be >= 0")
        check(self.n_head >= 1, "n_head", f"must be >= 1 (got {self.n_head})")
        check(self.n_embd >= 1, "n_embd", f"must be >= 1 (got {self.n_embd})")
        check(
            self.n_embd % self.n_head == 0,
            "n_embd",
            f"{self.n_embd} is not divisible by n_head={self.n_head}",
        )
        check(
            self.positions != "rope" or (self.n_embd // self.n_head) % 2 == 0,
            "n_embd",
            "head size n_embd/n_head must be even for rotary embeddings",
        )
        check(self.n_kv_head >= 0, "n_kv_head", f"must be >= 0 (got {self.n_kv_head})")
        check(
            self.n_head % self.kv_heads == 0,
            "n_kv_head",
            f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}",
        )
        check(self.d_ff >= 0, "d_ff", f"must be >= 0 (got {self.d_ff})")
        check(self.max_seq_len >= 1, "max_seq_len", f"must be >= 1 (got {self.max_seq_len})")
        check(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1) (got {self.dropout})")
        check(self.rope_theta > 0, "rope_theta", "must be > 0")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def ff_width(self) -> int:
        if self.d_ff:
            return self.d_ff
        return default_ff_width(self.n_embd) if self.mlp == "swiglu" else 4 * self.n_embd

    @property
    def is_default_architecture(self) -> bool:
        """Whether the architecture options are all Llama's (what every family supports)."""
        return (self.norm, self.mlp, self.positions, self.qkv_bias, self.bias) == (
            "rmsnorm", "swiglu", "rope", False, False
        )  # fmt: skip

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head


def init_parameters(model: nn.Module, std: float, depth: int) -> None:
    """Normal(0, std) matrices, unit norm gains, zero biases; residual-branch outputs scaled by
    1/sqrt(2 * depth) as in GPT-2, so activations stay O(1) however deep the stack."""
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            nn.init.zeros_(p)
        elif p.dim() == 1:
            nn.init.ones_(p)
        elif name.endswith(("attn.proj.weight", "cross.proj.weight", "mlp.down.weight")):
            nn.init.normal_(p, std=std / math.sqrt(2 * depth))
        else:
            nn.init.normal_(p, std=std)


class Transformer(nn.Module):
    """Embedding -> blocks -> final norm -> vocabulary head: what every family shares. `causal`
    picks decoder-style (masked) or encoder-style (bidirectional) self-attention."""

    def __init__(self, cfg: TransformerConfig, *, causal: bool):
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError("TransformerConfig.vocab_size must be set before building the model")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(
            Block(
                cfg.n_embd,
                cfg.n_head,
                cfg.kv_heads,
                cfg.ff_width,
                cfg.dropout,
                cfg.norm_eps,
                causal=causal,
                norm=cfg.norm,
                mlp=cfg.mlp,
                qkv_bias=cfg.qkv_bias,
                bias=cfg.bias,
            )
            for _ in range(cfg.n_layer)
        )
        self.norm = make_norm(cfg.norm, cfg.n_embd, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.rotary: Rotary | None = None
        self.pos_emb: nn.Embedding | None = None
        if cfg.positions == "rope":
            self.rotary = Rotary(cfg.head_size, cfg.max_seq_len, cfg.rope_theta)
        else:
            self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.n_embd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_parameters(self, self.cfg.init_std, self.cfg.n_layer)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel()
        return n

    def hidden_states(
        self,
        idx: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Final normed hidden states (B, T, D) for token ids idx (B, T).

        positions: (B, T) absolute positions, for left-padded or packed batches; by default
            0..T-1 continuing after whatever the cache holds.
        mask: boolean (B, 1, T, S) attention mask, True where a query may attend, or a float
            one (0 or -inf) added to the scores in the dtype attention runs in (fp32 for a
            one-token step with a cache on a CPU); by default causal attention (decoders) or
            full attention (encoders).
        cache: a KVCache; the new keys/values are appended and the cache advanced by T.
        """
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        x = self.tok_emb(idx)  # (B, T, D)
        cos = sin = None
        if self.rotary is not None:
            cos, sin = self.rotary(start, T, positions)
        else:
            assert self.pos_emb is not None
            x = x + self.pos_emb(self._positions(start, T, positions, idx.device))
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, mask, cache, i)
        if cache is not None:
            cache.advance(T)
        return self.norm(x)

    def _positions(
        self, start: int, T: int, positions: torch.Tensor | None, device: torch.device
    ) -> torch.Tensor:
        if positions is not None:
            return positions
        if start + T > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence of {start + T} tokens exceeds max_seq_len {self.cfg.max_seq_len}"
            )
        return torch.arange(start, start + T, device=device)

    def forward(
        self,
        idx: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V) for token ids idx (B, T); see `hidden_states` for the options."""
        return self.lm_head(self.hidden_states(idx, positions=positions, mask=mask, cache=cache))
