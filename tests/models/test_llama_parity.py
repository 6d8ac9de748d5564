"""Parity with Hugging Face `LlamaForCausalLM`: same weights, same logits.

This pins down the details that are easy to get subtly wrong (rotary layout, RMSNorm, SwiGLU
gate/up order, grouped-query heads) against an independent implementation.
"""

from __future__ import annotations

import pytest
import torch

from lmforge.models.decoder import Decoder
from lmforge.models.hf import to_hf
from lmforge.models.transformer import TransformerConfig

pytest.importorskip("transformers")


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
        hf = to_hf(ours).eval()
        x = torch.randint(0, 97, (2, 20))
        torch.testing.assert_close(ours(x), hf(x).logits, atol=2e-5, rtol=1e-4)
