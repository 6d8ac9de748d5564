from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import ConfigFieldError
from lmforge.models.decoder import Decoder
from lmforge.models.layers import decode_attention, grouped_decode_attention
from lmforge.models.transformer import TransformerConfig


def tiny(**kw: object) -> Decoder:
    torch.manual_seed(0)
    cfg = dict(vocab_size=50, n_layer=2, n_head=4, n_embd=32, max_seq_len=32)
    cfg.update(kw)
    return Decoder(TransformerConfig(**cfg)).eval()  # type: ignore[arg-type]


@pytest.mark.parametrize("n_kv_head", [0, 2, 1])
def test_later_tokens_never_change_earlier_logits(n_kv_head: int) -> None:
    model = tiny(n_kv_head=n_kv_head)
    x = torch.randint(0, 50, (2, 16))
    y = x.clone()
    y[:, 9:] = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.equal(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])


@pytest.mark.parametrize("n_kv_head", [0, 2])
def test_kv_cache_matches_full_forward(n_kv_head: int) -> None:
    model = tiny(n_kv_head=n_kv_head)
    x = torch.randint(0, 50, (3, 20))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(3)
        parts = [model(x[:, :7], cache=cache)]  # prefill, then one token at a time
        parts += [model(x[:, t : t + 1], cache=cache) for t in range(7, 20)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 20


def test_tied_embeddings_share_storage() -> None:
    m = tiny()
    assert m.lm_head.weight.data_ptr() == m.tok_emb.weight.data_ptr()
    untied = tiny(tie_embeddings=False)
    assert untied.lm_head.weight.data_ptr() != untied.tok_emb.weight.data_ptr()
    assert untied.num_params() - m.num_params() == 50 * 32


def test_config_validation_names_fields() -> None:
    with pytest.raises(ConfigFieldError) as e:
        TransformerConfig(n_embd=30, n_head=4)
    assert e.value.field == "n_embd"
    with pytest.raises(ConfigFieldError) as e:
        TransformerConfig(n_head=4, n_kv_head=3)
    assert e.value.field == "n_kv_head"


def test_too_long_sequence_is_refused() -> None:
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        tiny()(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_decode_attention_matches_sdpa(n_kv_head: int) -> None:
    # one query per row over cached keys, some of them padding: the KV-cache decoding path
    torch.manual_seed(0)
    B, H, S, hs = 3, 4, 9, 8
    q = torch.randn(B, H, 1, hs)
    k, v = torch.randn(B, n_kv_head, S, hs), torch.randn(B, n_kv_head, S, hs)
    mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
    mask[1, ..., :4] = False
    mask[2, ..., :8] = False
    rep = H // n_kv_head
    want = F.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), attn_mask=mask
    )
    torch.testing.assert_close(decode_attention(q, k, v, mask), want)
    groups = [(0, 1, 0), (1, 3, 4)]  # rows 1 and 2 hold only padding before position 4
    torch.testing.assert_close(grouped_decode_attention(q, k, v, mask, groups), want)


def test_a_row_part_of_the_cache_writes_into_the_whole() -> None:
    model = tiny()
    cache = model.new_cache(3, 10)
    part = cache.rows(1, 3, 4)
    k = torch.randn(2, 4, 5, 8)
    held, _ = part.update(0, k, k)
    assert torch.equal(held, k)  # what the part holds starts at its own first position
    assert torch.equal(cache.k[0, 1:3, :, 4:9], k)
    assert cache.k[0, 0].abs().sum() == 0 and cache.k[0, :, :, :4].abs().sum() == 0


def test_decode_attention_keeps_a_bf16_model_in_bf16() -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 1, 8), torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8)
    low = decode_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), None)
    assert low.dtype == torch.bfloat16
    want = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(low.float(), want, atol=2e-2, rtol=2e-2)
