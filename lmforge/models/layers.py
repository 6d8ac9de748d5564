"""Blocks shared by every model family: RMSNorm, rotary positions, attention, SwiGLU MLP.

Shape legend: B batch, T query length, S key length, D model width, H query heads,
Hkv key/value heads, hs head size, F MLP hidden width, V vocabulary.

Key choices
- RMSNorm (Zhang & Sennrich, 2019) instead of LayerNorm: no mean, no bias, cheaper.
- Rotary embeddings (Su et al., 2021, "RoFormer") in the rotate-half layout used by Llama and
  Hugging Face, so weights map to `LlamaForCausalLM` without permuting q/k.
- Grouped-query attention (Ainslie et al., 2023): `n_kv_head` divides `n_head`.
- SwiGLU (Shazeer, 2020) with gate and up projections fused into one matmul: on a CPU every
  separate small matmul costs dispatch overhead, so one wide matmul is measurably faster.
- Attention goes through `F.scaled_dot_product_attention`, which picks a fused kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.models.kv_cache import KVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def rope_tables(head_size: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (max_len, hs), for the rotate-half layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_size, 2, dtype=torch.float64) / head_size))
    t = torch.arange(max_len, dtype=torch.float64)
    freqs = torch.outer(t, inv_freq)  # (max_len, hs/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (max_len, hs)
    return emb.cos().float(), emb.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, hs) by position; cos/sin are (T, hs) or (B, 1, T, hs)."""
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    """Multi-head (or grouped-query) self-attention with rotary positions and a KV cache."""

    def __init__(self, d_model: int, n_head: int, n_kv_head: int, dropout: float, causal: bool):
        super().__init__()
        self.n_head, self.n_kv_head = n_head, n_kv_head
        self.head_size = d_model // n_head
        self.causal = causal
        self.dropout = dropout
        # q, k and v in one matmul: (D) -> (H + 2 Hkv) * hs
        self.qkv = nn.Linear(d_model, (n_head + 2 * n_kv_head) * self.head_size, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        B, T, D = x.shape
        hs, H, Hkv = self.head_size, self.n_head, self.n_kv_head
        q, k, v = self.qkv(x).split((H * hs, Hkv * hs, Hkv * hs), dim=-1)
        q = q.view(B, T, H, hs).transpose(1, 2)  # (B, H, T, hs)
        k = k.view(B, T, Hkv, hs).transpose(1, 2)  # (B, Hkv, T, hs)
        v = v.view(B, T, Hkv, hs).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, Hkv, S, hs) with S = cached + T
        if Hkv != H:
            k = k.repeat_interleave(H // Hkv, dim=1)
            v = v.repeat_interleave(H // Hkv, dim=1)
        # A plain causal mask only fits when queries and keys line up (training, first prefill).
        is_causal = self.causal and mask is None and k.size(2) == T and T > 1
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
        )  # (B, H, T, hs)
        y = y.transpose(1, 2).reshape(B, T, D)
        return self.proj(y)


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.d_ff = d_ff
        self.gate_up = nn.Linear(d_model, 2 * d_ff, bias=False)  # (D) -> (2F)
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).split(self.d_ff, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(
        self,
        d_model: int,
        n_head: int,
        n_kv_head: int,
        d_ff: int,
        dropout: float,
        eps: float,
        causal: bool,
    ):
        super().__init__()
        self.attn_norm = RMSNorm(d_model, eps)
        self.attn = Attention(d_model, n_head, n_kv_head, dropout, causal)
        self.mlp_norm = RMSNorm(d_model, eps)
        self.mlp = SwiGLU(d_model, d_ff)
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin, mask, cache, layer))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


def default_ff_width(d_model: int) -> int:
    """SwiGLU width 8/3 * D (same parameters as a 4*D GELU MLP), rounded up to a multiple of 32."""
    return 32 * ((8 * d_model // 3 + 31) // 32)
