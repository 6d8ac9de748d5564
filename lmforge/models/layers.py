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
- GPT-2's variants (LayerNorm, a GELU MLP, biases) and Qwen2's q/k/v biases are options, off by
  default, so that imported Hugging Face checkpoints of those families run on these blocks.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.models.kv_cache import KVCache, RowGroup

Norm = Literal["rmsnorm", "layernorm"]
MLP = Literal["swiglu", "gelu"]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def make_norm(kind: Norm, dim: int, eps: float) -> nn.Module:
    return RMSNorm(dim, eps) if kind == "rmsnorm" else nn.LayerNorm(dim, eps)


def rope_tables(head_size: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin tables, each (max_len, hs), for the rotate-half layout.

    The sin table carries the rotation's sign (-sin on the first half, +sin on the second), so
    applying it needs one swap of halves instead of a negation and a concatenation.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_size, 2, dtype=torch.float64) / head_size))
    t = torch.arange(max_len, dtype=torch.float64)
    freqs = torch.outer(t, inv_freq)  # (max_len, hs/2)
    cos = torch.cat((freqs.cos(), freqs.cos()), dim=-1)  # (max_len, hs)
    sin = torch.cat((-freqs.sin(), freqs.sin()), dim=-1)
    return cos.float(), sin.float()


class Rotary(nn.Module):
    """The rotary tables of a model and the (cos, sin) slices a forward pass needs."""

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, head_size: int, max_len: int, theta: float):
        super().__init__()
        cos, sin = rope_tables(head_size, max_len, theta)
        # Derived from the config, so not saved in checkpoints.
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.max_len = max_len

    def forward(
        self, start: int, T: int, positions: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) shaped (T, 1, hs) for positions start..start+T-1, or (B, T, 1, hs) for
        explicit positions (B, T), ready to broadcast over (B, T, heads, hs)."""
        if positions is not None:
            return self.cos[positions].unsqueeze(2), self.sin[positions].unsqueeze(2)
        if start + T > self.max_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len {self.max_len}")
        return self.cos[start : start + T, None], self.sin[start : start + T, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, nh, hs) by position; cos/sin broadcast as (T, 1, hs) or (B, T, 1, hs).

    Equals x * cos + rotate_half(x) * sin with rotate_half(x) = (-x2, x1), as in Llama.
    """
    half = x.size(-1) // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)  # (x2, x1)
    return torch.addcmul(x * cos, swapped, sin).to(x.dtype)


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Attention of one new query per row, q (B, H, 1, hs), over the cached keys and values
    (B, Hkv, S, hs) on a CPU; mask (B, 1, 1, S) hides pad keys. Returns (B, H, 1, hs).

    A bf16 model's query, keys and values go to fp32 first: CPU bf16 attention kernels of this
    shape run far below memory speed (a whole bf16 sampling call measured 1.1-1.2x faster).
    """
    dtype = q.dtype
    if dtype != torch.float32:
        q, k, v = q.float(), k.float(), v.float()
    rep = q.size(1) // k.size(1)  # query heads per key/value head (GQA)
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).to(dtype)


def grouped_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    groups: list[RowGroup],
) -> torch.Tensor:
    """`decode_attention` per row group of the cache (see kv_cache.py): each group's rows read
    their keys from the group's first non-padding position on."""
    if len(groups) == 1 and groups[0][2] == 0:
        return decode_attention(q, k, v, mask)
    parts = []
    for first, end, start in groups:
        part_mask = None if mask is None else mask[first:end, :, :, start:]
        parts.append(
            decode_attention(
                q[first:end], k[first:end, :, start:], v[first:end, :, start:], part_mask
            )
        )
    return torch.cat(parts)


class Attention(nn.Module):
    """Multi-head (or grouped-query) self-attention with rotary positions and a KV cache."""

    def __init__(
        self,
        d_model: int,
        n_head: int,
        n_kv_head: int,
        dropout: float,
        causal: bool,
        qkv_bias: bool = False,
        bias: bool = False,
    ):
        super().__init__()
        self.n_head, self.n_kv_head = n_head, n_kv_head
        self.head_size = d_model // n_head
        self.causal = causal
        self.dropout = dropout
        # q, k and v in one matmul: (D) -> (H + 2 Hkv) * hs
        self.qkv = nn.Linear(d_model, (n_head + 2 * n_kv_head) * self.head_size, bias=qkv_bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        B, T, D = x.shape
        hs, H, Hkv = self.head_size, self.n_head, self.n_kv_head
        qkv = self.qkv(x).view(B, T, H + 2 * Hkv, hs)
        # Rotate q and k heads together: one set of elementwise kernels instead of two. No
        # tables means learned absolute positions, already added to the input (GPT-2).
        qk = qkv[:, :, : H + Hkv]  # (B, T, H + Hkv, hs)
        if cos is not None and sin is not None:
            qk = apply_rope(qk, cos, sin)
        q = qk[:, :, :H].transpose(1, 2)  # (B, H, T, hs)
        k = qk[:, :, H:].transpose(1, 2)  # (B, Hkv, T, hs)
        v = qkv[:, :, H + Hkv :].transpose(1, 2)  # (B, Hkv, T, hs)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, Hkv, S, hs) with S = cached + T
            if T == 1 and x.device.type == "cpu":  # row groups, fp32 maths: measured on CPUs
                y = grouped_decode_attention(q, k, v, mask, cache.groups)
                return self.proj(y.transpose(1, 2).reshape(B, T, D))
        if Hkv != H:
            k = k.repeat_interleave(H // Hkv, dim=1)
            v = v.repeat_interleave(H // Hkv, dim=1)
        # A plain causal mask only fits when queries and keys line up (training, first prefill).
        is_causal = bool(self.causal and mask is None and k.size(2) == T and T > 1)
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


class GeluMLP(nn.Module):
    """GPT-2's MLP: up to F, GELU (tanh approximation, GPT-2's "gelu_new"), down."""

    def __init__(self, d_model: int, d_ff: int, bias: bool):
        super().__init__()
        self.up = nn.Linear(d_model, d_ff, bias=bias)
        self.down = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x), approximate="tanh"))


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
        *,
        norm: Norm = "rmsnorm",
        mlp: MLP = "swiglu",
        qkv_bias: bool = False,
        bias: bool = False,
    ):
        super().__init__()
        self.attn_norm = make_norm(norm, d_model, eps)
        self.attn = Attention(d_model, n_head, n_kv_head, dropout, causal, qkv_bias, bias)
        self.mlp_norm = make_norm(norm, d_model, eps)
        self.mlp = SwiGLU(d_model, d_ff) if mlp == "swiglu" else GeluMLP(d_model, d_ff, bias)
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin, mask, cache, layer))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class CrossAttention(nn.Module):
    """Decoder queries attend to the encoder's output ("memory"). No rotary phases here: the
    memory already carries its positions, and query and key positions are not comparable."""

    def __init__(self, d_model: int, n_head: int, n_kv_head: int, dropout: float):
        super().__init__()
        self.n_head, self.n_kv_head = n_head, n_kv_head
        self.head_size = d_model // n_head
        self.dropout = dropout
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.kv = nn.Linear(d_model, 2 * n_kv_head * self.head_size, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, Hkv, S, hs) of the memory (B, S, D): computed once per input."""
        B, S, _ = memory.shape
        k, v = self.kv(memory).view(B, S, 2, self.n_kv_head, self.head_size).unbind(2)
        return k.transpose(1, 2), v.transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, D = x.shape
        q = self.q(x).view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, H, T, hs)
        k, v = kv
        if self.n_kv_head != self.n_head:
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class CrossBlock(nn.Module):
    """Decoder block of an encoder-decoder: causal self-attention, cross-attention, MLP."""

    def __init__(
        self, d_model: int, n_head: int, n_kv_head: int, d_ff: int, dropout: float, eps: float
    ):
        super().__init__()
        self.attn_norm = RMSNorm(d_model, eps)
        self.attn = Attention(d_model, n_head, n_kv_head, dropout, causal=True)
        self.cross_norm = RMSNorm(d_model, eps)
        self.cross = CrossAttention(d_model, n_head, n_kv_head, dropout)
        self.mlp_norm = RMSNorm(d_model, eps)
        self.mlp = SwiGLU(d_model, d_ff)
        self.drop = nn.Dropout(dropout)

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This block's cross-attention keys and values (B, Hkv, S, hs) of the memory (B, S, D)."""
        return self.cross.memory_kv(memory)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        memory_kv: tuple[torch.Tensor, torch.Tensor] | torch.Tensor,
        memory_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        """`memory_kv`: this block's keys and values of the memory, from `memory_kv` (computed
        once, reused at every decoding step), or the memory (B, S, D) itself, whose keys and
        values are then computed here. Training does the latter, so that what wraps a block's
        forward (FSDP gathering its weights, activation checkpointing) covers them too."""
        if isinstance(memory_kv, torch.Tensor):
            memory_kv = self.cross.memory_kv(memory_kv)
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin, None, cache, layer))
        x = x + self.drop(self.cross(self.cross_norm(x), memory_kv, memory_mask))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


def default_ff_width(d_model: int) -> int:
    """SwiGLU width 8/3 * D (same parameters as a 4*D GELU MLP), rounded up to a multiple of 32."""
    return 32 * ((8 * d_model // 3 + 31) // 32)
