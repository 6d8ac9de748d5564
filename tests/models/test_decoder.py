from __future__ import annotations

import pytest
import torch

from lmforge.config import ConfigFieldError
from lmforge.models.decoder import Decoder
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
