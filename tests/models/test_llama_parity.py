"""Parity with Hugging Face `LlamaForCausalLM`: same weights, same logits.

This pins down the details that are easy to get subtly wrong (rotary layout, RMSNorm, SwiGLU
gate/up order, grouped-query heads) against an independent implementation.
"""

from __future__ import annotations

import pytest
import torch

from lmforge.models.decoder import Decoder
from lmforge.models.transformer import TransformerConfig

transformers = pytest.importorskip("transformers")


def to_llama(model: Decoder) -> torch.nn.Module:
    c = model.cfg
    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=c.vocab_size,
            hidden_size=c.n_embd,
            intermediate_size=c.ff_width,
            num_hidden_layers=c.n_layer,
            num_attention_heads=c.n_head,
            num_key_value_heads=c.kv_heads,
            max_position_embeddings=c.max_seq_len,
            rms_norm_eps=c.norm_eps,
            rope_theta=c.rope_theta,
            tie_word_embeddings=c.tie_embeddings,
            attention_bias=False,
            mlp_bias=False,
        )
    )
    q, kv, F = c.n_head * c.head_size, c.kv_heads * c.head_size, c.ff_width
    sd = {"model.embed_tokens.weight": model.tok_emb.weight, "model.norm.weight": model.norm.weight}
    sd["lm_head.weight"] = model.lm_head.weight
    for i, b in enumerate(model.blocks):
        p = f"model.layers.{i}."
        w = b.attn.qkv.weight
        sd |= {
            p + "input_layernorm.weight": b.attn_norm.weight,
            p + "self_attn.q_proj.weight": w[:q],
            p + "self_attn.k_proj.weight": w[q : q + kv],
            p + "self_attn.v_proj.weight": w[q + kv :],
            p + "self_attn.o_proj.weight": b.attn.proj.weight,
            p + "post_attention_layernorm.weight": b.mlp_norm.weight,
            p + "mlp.gate_proj.weight": b.mlp.gate_up.weight[:F],
            p + "mlp.up_proj.weight": b.mlp.gate_up.weight[F:],
            p + "mlp.down_proj.weight": b.mlp.down.weight,
        }
    missing, unexpected = hf.load_state_dict({k: v.detach() for k, v in sd.items()}, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return hf.eval()


@pytest.mark.parametrize(("n_kv_head", "tie"), [(0, True), (2, False)])
def test_logits_match_llama(n_kv_head: int, tie: bool) -> None:
    torch.manual_seed(0)
    cfg = TransformerConfig(
        vocab_size=97, n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=64, max_seq_len=32,
        tie_embeddings=tie, rope_theta=500.0,
    )  # fmt: skip
    ours = Decoder(cfg).eval()
    with torch.no_grad():
        for p in ours.parameters():  # non-trivial norm gains too
            p.add_(0.05 * torch.randn_like(p))
        hf = to_llama(ours)
        x = torch.randint(0, 97, (2, 20))
        torch.testing.assert_close(ours(x), hf(x).logits, atol=2e-5, rtol=1e-4)
