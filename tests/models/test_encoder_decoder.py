from __future__ import annotations

import pytest
import torch

from lmforge.generation.generate import SamplingConfig, generate_seq2seq
from lmforge.models.encoder_decoder import EncoderDecoder
from lmforge.models.transformer import TransformerConfig


@pytest.fixture(scope="module")
def model() -> EncoderDecoder:
    torch.manual_seed(0)
    cfg = TransformerConfig(
        vocab_size=60, n_layer=2, n_decoder_layer=3, n_head=4, n_kv_head=2, n_embd=32,
        max_seq_len=40,
    )  # fmt: skip
    return EncoderDecoder(cfg).eval()


def test_decoder_is_causal_and_encoder_bidirectional(model: EncoderDecoder) -> None:
    src = torch.randint(0, 60, (2, 12))
    tgt = torch.randint(0, 60, (2, 10))
    with torch.no_grad():
        base = model(src, tgt)
        tgt2 = tgt.clone()
        tgt2[:, 6:] = (tgt2[:, 6:] + 1) % 60
        later_tgt = model(src, tgt2)
        src2 = src.clone()
        src2[:, -1] = (src2[:, -1] + 1) % 60
        later_src = model(src2, tgt)
    assert torch.equal(base[:, :6], later_tgt[:, :6])  # output positions see only the past
    assert not torch.allclose(base[:, 6:], later_tgt[:, 6:])
    assert not torch.allclose(base[:, 0], later_src[:, 0])  # every position sees all the input


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cached_and_uncached_decoding_agree(model: EncoderDecoder, temperature: float) -> None:
    sources = [[5, 6, 7, 8, 9, 10], [3, 4], [11, 12, 13]]
    outs = [
        generate_seq2seq(
            model,
            sources,
            SamplingConfig(max_new_tokens=15, temperature=temperature, seed=2, use_cache=c),
            start_id=1,
            eos_id=None,
        )
        for c in (True, False)
    ]
    assert outs[0] == outs[1] and all(len(o) == 15 for o in outs[0])


def test_padded_batch_equals_one_by_one(model: EncoderDecoder) -> None:
    sources = [[5, 6, 7, 8, 9, 10], [3, 4]]
    cfg = SamplingConfig(max_new_tokens=8)
    batched = generate_seq2seq(model, sources, cfg, start_id=1, eos_id=None)
    single = [generate_seq2seq(model, [s], cfg, start_id=1, eos_id=None)[0] for s in sources]
    assert batched == single


def test_vocab_size_keeps_sentinel_ids_out_of_decoded_text() -> None:
    """Span corruption's sentinels sit past the tokenizer's vocabulary; text for a reader
    (chat, eval, sampling) is drawn below `vocab_size` even when a sentinel is the likeliest."""
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=40, n_layer=1, n_head=2, n_embd=16, max_seq_len=32)
    model = EncoderDecoder(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight[36:] *= 0
        model.lm_head.weight[36:, 0] = 1e4  # make ids 36..39 dominate wherever feature 0 > 0
    sampling = SamplingConfig(max_new_tokens=12, temperature=1.0, seed=3)
    sources = [[5, 6, 7], [8, 9]]
    free = generate_seq2seq(model, sources, sampling, start_id=1, eos_id=None)
    capped = generate_seq2seq(model, sources, sampling, start_id=1, eos_id=None, vocab_size=36)
    assert any(i >= 36 for row in free for i in row)  # the unmasked model does draw them
    assert all(0 <= i < 36 for row in capped for i in row)
