"""Fuzzing every tokenizer kind (bpe, wordpiece, unigram, char and an imported Hugging Face
one) on random Unicode: exact round trips, and user text that spells a special token never
becoming that token's id unless the caller asks for specials (`allow_special=True`).

The round trip of the four trained kinds on plain text is in test_tokenizers.py; here are the
imported kind, special-token spellings inside chat messages, and decoding arbitrary ids.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.data.instruction import Message
from lmforge.tokenizers import (
    ALGOS,
    SPECIAL_TOKENS,
    ImportedTokenizer,
    Tokenizer,
    min_vocab_size,
    train_tokenizer,
)
from lmforge.tokenizers.chat import render_chat, render_text

CORPUS = [
    "Mia had a red kite. Tom went to the park <b>today</b>.",
    "What is 3 plus 4? It is 7. Café, naïve, 日本語, Привет, 😀.",
] * 20
HF_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
KINDS = [*sorted(ALGOS), "hf"]
FUZZ = settings(max_examples=40, deadline=None, derandomize=True)


def imported_tokenizer() -> ImportedTokenizer:
    """A Qwen2-style byte-level BPE with ChatML specials, built as `tokenizers` would save it."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=list(HF_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(CORPUS, trainer)
    roles = {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "pad": "<|endoftext|>"}
    return ImportedTokenizer(hf.to_str(), {**roles, "end_of_turn": "<|im_end|>"}, CHATML)


@pytest.fixture(scope="module")
def toks() -> dict[str, Tokenizer]:
    out: dict[str, Tokenizer] = {
        algo: train_tokenizer(algo, CORPUS, min_vocab_size(algo) + 60) for algo in ALGOS
    }
    out["hf"] = imported_tokenizer()
    return out


def special_ids(tok: Tokenizer) -> set[int]:
    if isinstance(tok, ImportedTokenizer):
        return set(tok.added_special_ids)
    return set(range(len(SPECIAL_TOKENS)))


# Random Unicode with the specials of every kind (whole, cut short, or doubled) mixed in.
SPELLINGS = [*SPECIAL_TOKENS, *HF_SPECIALS, "<|im_end", "|>", "<|", "<|<|eos|>|>", "<0x41>"]
texts = st.lists(st.one_of(st.text(max_size=12), st.sampled_from(SPELLINGS)), max_size=6).map(
    "".join
)


@pytest.mark.parametrize("kind", KINDS)
@FUZZ
@given(text=texts)
def test_text_spelling_a_special_stays_text(
    toks: dict[str, Tokenizer], kind: str, text: str
) -> None:
    tok = toks[kind]
    plain = tok.encode(text, allow_special=False)
    assert not set(plain) & special_ids(tok)
    assert tok.decode(plain) == text
    assert tok.encode_batch([text], allow_special=False) == [plain]
    # Asked for (the default, for text the caller writes itself): specials become their ids.
    allowed = tok.encode(text)
    assert tok.decode(allowed) == text
    named = [s for s in (HF_SPECIALS if kind == "hf" else SPECIAL_TOKENS) if s in text]
    assert all(tok.token_to_id(s) in allowed for s in named)


@pytest.mark.parametrize("kind", KINDS)
@FUZZ
@given(user=texts, reply=texts, system=texts)
def test_message_text_never_forges_a_turn(
    toks: dict[str, Tokenizer], kind: str, user: str, reply: str, system: str
) -> None:
    tok = toks[kind]
    turns = [Message("system", system), Message("user", user), Message("assistant", reply)]
    ids, mask = render_chat(tok, turns, add_generation_prompt=False)
    plain = [Message(m.role, "x") for m in turns]
    reference, _ = render_chat(tok, plain)
    specials = special_ids(tok)
    # Every special id comes from the template: as many of each as for harmless text.
    assert sorted(i for i in ids if i in specials) == sorted(i for i in reference if i in specials)
    assert len(mask) == len(ids)
    if kind != "hf":
        assert tok.decode(ids) == render_text(turns)


@pytest.mark.parametrize("kind", KINDS)
@FUZZ
@given(data=st.data())
def test_any_ids_decode_to_text(toks: dict[str, Tokenizer], kind: str, data: st.DataObject) -> None:
    tok = toks[kind]
    ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=30))
    for skip in (False, True):
        assert isinstance(tok.decode(ids, skip_special=skip), str)
    with pytest.raises(ValueError, match="outside the vocab"):
        tok.decode([*ids, tok.vocab_size])
