"""Tests for lmforge.tokenizers: exact round trip, special tokens, save/load, vocab sizes."""

from __future__ import annotations

import json
import pickle
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from lmforge.errors import UserError
from lmforge.tokenizers import (
    ALGOS,
    META_FILE,
    SPECIAL_NAMES,
    SPECIAL_TOKENS,
    TOKENIZER_FILE,
    Tokenizer,
    load_tokenizer,
    min_vocab_size,
    train_tokenizer,
)

# A few hundred English sentences from templates, plus text that stresses exactness.
# fmt: off
_SUBJECTS = ["the cat", "a dog", "my neighbour", "the old teacher", "every student",
             "our small team", "the river", "a bird", "this machine", "the children"]
_VERBS = ["watched", "found", "carried", "painted", "remembered", "followed", "described",
          "built", "opened", "explained", "ignored", "visited"]
_OBJECTS = ["the red door", "a quiet garden", "three letters", "the morning train",
            "an empty house", "the long story", "a broken window", "the tall mountains",
            "two yellow boxes", "the whole city"]
_TAILS = ["yesterday", "before dinner", "in the rain", "without a word", "after the meeting",
          "for many years", "on Sunday morning", "with great care", "near the station",
          "again and again"]
# fmt: on
_UNICODE = [
    "Café, naïve, résumé, Ærøskøbing, Straße — «quotes» and “curly” ones…",
    "Привет, как дела? Всё хорошо, спасибо.",
    "日本語のテキストと中文文本，还有한국어 문장도 있어요。",
    "Emoji: 😀 🎉 👩‍👩‍👧 🇫🇷 and combining marks: e\u0301 a\u0308 n\u0303.",
    "def f(x):\n\treturn x  # tabs\tand  double  spaces\r\nwindows line",
    "Numbers 3.14159, 2,718 and 1e-9; symbols @#$%^&*()[]{}<>|\\/~`",
]


def make_corpus(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(p) for p in (_SUBJECTS, _VERBS, _OBJECTS, _TAILS)]
        out.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", ";"]))
    return out + _UNICODE


CORPUS = make_corpus(400, seed=0)
HELD_OUT = make_corpus(100, seed=1)
VOCAB = {"bpe": 512, "wordpiece": 640, "unigram": 400, "char": 1000}


@pytest.fixture(scope="module")
def toks() -> dict[str, Tokenizer]:
    return {algo: train_tokenizer(algo, CORPUS, VOCAB[algo]) for algo in ALGOS}


def no_specials(text: str) -> bool:
    return not any(s in text for s in SPECIAL_TOKENS)


# Arbitrary code points plus fragments that broke naive schemes: whitespace runs, CRLF, the
# SentencePiece space mark, "##", byte-token lookalikes, emoji and combining marks.
# fmt: off
_FRAGMENTS = ["\r\n", "  ", "\t", "\n\n", "▁", "##", "#", "<0x41>", "<|", "|>", "😀", "e\u0301",
              "中文", " a"]
# fmt: on
texts = st.lists(st.one_of(st.text(), st.sampled_from(_FRAGMENTS)), max_size=8).map("".join)


# ---- exact round trip


@pytest.mark.parametrize("algo", list(ALGOS))
@settings(deadline=None, max_examples=150)
@given(text=texts)
def test_round_trip_is_exact(toks: dict[str, Tokenizer], algo: str, text: str) -> None:
    assume(no_specials(text))
    tok = toks[algo]
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.unk_id not in ids  # every algo spells unknown text with bytes, never <|unk|>


@pytest.mark.parametrize("algo", list(ALGOS))
def test_round_trip_on_corpus_and_batch_matches_single(
    toks: dict[str, Tokenizer], algo: str
) -> None:
    tok = toks[algo]
    batch = tok.encode_batch(HELD_OUT, add_bos=True, add_eos=True)
    for text, ids in zip(HELD_OUT, batch, strict=True):
        assert ids == tok.encode(text, add_bos=True, add_eos=True)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert tok.decode(ids, skip_special=True) == text
        assert tok.decode(ids) == "<|bos|>" + text + "<|eos|>"


# ---- special tokens


@pytest.mark.parametrize("algo", list(ALGOS))
def test_special_ids_are_0_to_8(toks: dict[str, Tokenizer], algo: str) -> None:
    tok = toks[algo]
    assert [tok.token_to_id(s) for s in SPECIAL_TOKENS] == list(range(9))
    assert [tok.id_to_token(i) for i in range(9)] == list(SPECIAL_TOKENS)
    assert tok.special_ids == dict(zip(SPECIAL_NAMES, range(9), strict=True))
    assert tok.special_ids["end_of_turn"] == 8
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id, tok.mask_id) == (0, 1, 2, 3, 4)


@pytest.mark.parametrize("algo", list(ALGOS))
@settings(deadline=None, max_examples=60)
@given(before=texts, after=texts, which=st.integers(0, 8))
def test_specials_never_split(
    toks: dict[str, Tokenizer], algo: str, before: str, after: str, which: int
) -> None:
    text = before + SPECIAL_TOKENS[which] + after
    assume(sum(text.count(s) for s in SPECIAL_TOKENS) == 1)  # just the one we put in
    tok = toks[algo]
    ids = tok.encode(text)
    # Specials are cut out first; the text on each side is encoded on its own.
    assert ids == tok.encode(before) + [which] + tok.encode(after)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special=True) == before + after
    # Untrusted text: the same string is plain text, spelt without any special id.
    plain = tok.encode(text, allow_special=False)
    assert not set(plain) & set(range(9))
    assert tok.decode(plain) == text


@pytest.mark.parametrize("algo", list(ALGOS))
def test_plain_mode_spells_all_specials_as_text(toks: dict[str, Tokenizer], algo: str) -> None:
    tok = toks[algo]
    text = " ".join(SPECIAL_TOKENS) + "".join(SPECIAL_TOKENS) + "<0x41><0xFF>"
    assert set(tok.encode(text)) >= set(range(9))
    plain = tok.encode(text, allow_special=False)
    assert min(plain) >= 9 and tok.decode(plain) == text
    assert tok.encode_batch([text], allow_special=False) == [plain]


# ---- vocab sizes and validation


@pytest.mark.parametrize("algo", ["bpe", "wordpiece", "unigram"])
def test_exact_vocab_size(toks: dict[str, Tokenizer], algo: str) -> None:
    assert toks[algo].vocab_size == VOCAB[algo]
    assert toks[algo].id_to_token(VOCAB[algo] - 1)
    with pytest.raises(IndexError):
        toks[algo].id_to_token(VOCAB[algo])


def test_char_vocab_is_seen_chars_capped(toks: dict[str, Tokenizer]) -> None:
    counts: dict[str, int] = {}
    for text in CORPUS:
        for c in text:
            counts[c] = counts.get(c, 0) + 1
    frequent = {c for c, n in counts.items() if n >= 2}
    assert toks["char"].vocab_size == 9 + 256 + len(frequent)
    capped = train_tokenizer("char", CORPUS, 265 + 5)
    assert capped.vocab_size == 270
    # The cap keeps the most frequent characters; the space is the most frequent of all.
    assert capped.token_to_id(" ") is not None
    assert capped.decode(capped.encode("Straße 😀")) == "Straße 😀"


def test_small_corpus_gives_smaller_vocab() -> None:
    tok = train_tokenizer("bpe", ["abc abc"], 2000)
    assert 265 < tok.vocab_size < 2000


def test_min_vocab_sizes() -> None:
    assert min_vocab_size("bpe") == 265
    assert min_vocab_size("char") == 265
    assert min_vocab_size("wordpiece") == 521
    assert 265 < min_vocab_size("unigram") < 400
    for algo in ALGOS:  # the minimum itself trains and still round-trips
        tok = train_tokenizer(algo, CORPUS[:50], min_vocab_size(algo))
        assert tok.vocab_size == min_vocab_size(algo) or algo == "char"
        assert tok.decode(tok.encode("Any text: ünïcödé 😀\n")) == "Any text: ünïcödé 😀\n"


def test_too_small_vocab_raises_before_training() -> None:
    consumed = []

    def corpus() -> Iterator[str]:
        consumed.append(True)
        yield "some text"

    with pytest.raises(
        UserError,
        match=r"vocab_size 100 is too small for bpe: it needs at least 265 "
        r"\(9 special tokens \+ 256 bytes\)",
    ):
        train_tokenizer("bpe", corpus(), 100)
    with pytest.raises(UserError, match="wordpiece: it needs at least 521"):
        train_tokenizer("wordpiece", corpus(), 520)
    assert not consumed


def test_unknown_algo_lists_valid_ones() -> None:
    with pytest.raises(
        UserError, match="unknown tokenizer algo 'sentencepiece'.*bpe, wordpiece, unigram, char"
    ):
        train_tokenizer("sentencepiece", CORPUS, 1000)
    with pytest.raises(UserError, match="unknown tokenizer algo"):
        min_vocab_size("BPE")


@pytest.mark.parametrize("bad", [[], ["", ""], iter(())])
def test_empty_corpus_raises(bad: list[str]) -> None:
    with pytest.raises(UserError, match="no training text"):
        train_tokenizer("bpe", bad, 300)


def test_single_string_corpus_raises() -> None:
    with pytest.raises(UserError, match="iterable of strings"):
        train_tokenizer("bpe", "just one string", 300)


def test_streaming_corpus_trains_like_a_list(toks: dict[str, Tokenizer]) -> None:
    tok = train_tokenizer("bpe", (t for t in ["", *CORPUS]), VOCAB["bpe"])
    assert tok.fingerprint == toks["bpe"].fingerprint


@pytest.mark.parametrize("algo", list(ALGOS))
def test_training_is_deterministic(toks: dict[str, Tokenizer], algo: str) -> None:
    # HF's WordPiece and Unigram trainers alone differ from run to run (hash-map order).
    for _ in range(3):
        assert train_tokenizer(algo, CORPUS, VOCAB[algo]).fingerprint == toks[algo].fingerprint
    small = [train_tokenizer(algo, CORPUS, min_vocab_size(algo) + 20) for _ in range(3)]
    assert len({tok.fingerprint for tok in small}) == 1


@pytest.mark.parametrize("algo", list(ALGOS))
def test_long_runs_round_trip_fast(toks: dict[str, Tokenizer], algo: str) -> None:
    # One 20,000-byte "word" each; wordpiece cuts words into 100-byte chunks to stay linear.
    for text in ["x" * 20_000, " " * 20_000, "ab" * 10_000, "é" * 10_000, "#" * 20_000]:
        assert toks[algo].decode(toks[algo].encode(text)) == text


def test_unigram_leaves_rare_characters_to_bytes() -> None:
    # More distinct characters than the vocab can hold: HF's trainer alone fails on this.
    cjk = ["".join(chr(0x4E00 + (i * 7919) % 20_000) for i in range(j, j + 40)) for j in range(500)]
    tok = train_tokenizer("unigram", CORPUS + cjk, 400)
    assert tok.vocab_size == 400
    text = "".join(cjk[::50]) + " the cat"
    assert tok.decode(tok.encode(text)) == text
    assert any(tok.id_to_token(i).startswith("<0x") for i in tok.encode(text))


def test_wordpiece_has_every_byte_in_both_roles(toks: dict[str, Tokenizer]) -> None:
    tok = toks["wordpiece"]
    starts = [tok.id_to_token(i) for i in range(9, 9 + 256)]
    assert len(set(starts)) == 256 and not any(t.startswith("#") and t != "#" for t in starts)
    assert [tok.token_to_id("##" + c) for c in starts] == list(range(9 + 256, 9 + 512))
    learned = [tok.id_to_token(i) for i in range(9 + 512, tok.vocab_size)]
    assert all(len(t.removeprefix("##")) > 1 for t in learned)


def test_pickle_round_trip(toks: dict[str, Tokenizer]) -> None:
    for tok in toks.values():
        copy = pickle.loads(pickle.dumps(tok))
        assert copy.fingerprint == tok.fingerprint
        assert copy.encode_batch(HELD_OUT) == tok.encode_batch(HELD_OUT)


# ---- compression and word starts


def test_bpe_compresses_english(toks: dict[str, Tokenizer]) -> None:
    bpt = toks["bpe"].bytes_per_token(HELD_OUT)
    assert bpt > 2.0
    assert bpt > toks["char"].bytes_per_token(HELD_OUT) >= 1.0
    with pytest.raises(UserError, match="no text"):
        toks["bpe"].bytes_per_token([""])


@settings(deadline=None, max_examples=50)
@given(words=st.lists(st.from_regex(r"[a-zA-Z]{1,15}", fullmatch=True), min_size=1, max_size=12))
def test_wordpiece_word_starts_are_word_boundaries(
    toks: dict[str, Tokenizer], words: list[str]
) -> None:
    tok = toks["wordpiece"]
    text = " ".join(words)
    ids = tok.encode(text)
    starts = [k for k, i in enumerate(ids) if tok.is_word_start(i)]
    assert len(starts) == len(words)
    # Each word-start token begins exactly where a word does (a word holds its leading space).
    offsets = [len(tok.decode(ids[:k])) for k in starts]
    expected, pos = [], 0
    for w in words:
        expected.append(max(pos - 1, 0))
        pos += len(w) + 1
    assert offsets == expected
    for i in ids:
        assert tok.is_word_start(i) == (not tok.id_to_token(i).startswith("##"))


def test_word_start_rules_of_other_algos(toks: dict[str, Tokenizer]) -> None:
    text = "the children painted two yellow boxes"
    for algo in ("bpe", "unigram"):  # a word starts with its space, like RoBERTa / SentencePiece
        ids = toks[algo].encode(text)
        assert sum(map(toks[algo].is_word_start, ids)) == text.count(" ")
    char = toks["char"]
    assert all(char.is_word_start(i) for i in char.encode(text))
    # A character spelt in bytes starts only at its first byte.
    ids = char.encode("\U0001f99c")  # parrot: not in the corpus, so four byte tokens
    assert [char.is_word_start(i) for i in ids] == [True, False, False, False]
    for tok in toks.values():
        assert all(tok.is_word_start(i) for i in range(9))
        assert len(tok.word_starts) == tok.vocab_size


# ---- save and load


@pytest.mark.parametrize("algo", list(ALGOS))
def test_save_load_round_trip(toks: dict[str, Tokenizer], algo: str, tmp_path: Path) -> None:
    tok = toks[algo]
    out = tmp_path / "nested" / "tok"
    tok.save(out)
    assert sorted(p.name for p in out.iterdir()) == [TOKENIZER_FILE, META_FILE]  # no temp files
    meta = json.loads((out / META_FILE).read_text())
    assert meta["algo"] == algo and meta["vocab_size"] == tok.vocab_size
    assert meta["fingerprint"] == tok.fingerprint and meta["format_version"] == 1
    assert meta["special_ids"] == tok.special_ids

    for path in (out, out / TOKENIZER_FILE, str(out)):
        loaded = load_tokenizer(path, expected_vocab_size=tok.vocab_size)
        assert loaded.algo == algo and loaded.fingerprint == tok.fingerprint
        assert loaded.encode_batch(HELD_OUT) == tok.encode_batch(HELD_OUT)
        assert loaded.word_starts == tok.word_starts
    # Saving the loaded copy writes the same bytes.
    loaded.save(tmp_path / "again")
    for name in (TOKENIZER_FILE, META_FILE):
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes()


def test_load_vocab_mismatch_names_both_sizes(toks: dict[str, Tokenizer], tmp_path: Path) -> None:
    toks["bpe"].save(tmp_path)
    with pytest.raises(
        UserError,
        match=r"tokenizer has 512 tokens but the model expects 4096 \(vocab sizes must match\)",
    ) as e:
        load_tokenizer(tmp_path, expected_vocab_size=4096)
    assert str(tmp_path) in str(e.value)


def test_load_errors_name_the_path(toks: dict[str, Tokenizer], tmp_path: Path) -> None:
    with pytest.raises(UserError, match="tokenizer directory not found"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(UserError, match=f"{TOKENIZER_FILE}: file not found"):
        load_tokenizer(tmp_path)
    toks["unigram"].save(tmp_path)
    tok_file, meta_file = tmp_path / TOKENIZER_FILE, tmp_path / META_FILE
    original = tok_file.read_text(encoding="utf-8")

    tok_file.write_text(original.replace('"<|eos|>"', '"<|EOS|>"', 1), encoding="utf-8")
    with pytest.raises(UserError, match="fingerprint .* does not match"):
        load_tokenizer(tmp_path)
    tok_file.write_text(original[:-10], encoding="utf-8")
    with pytest.raises(UserError, match=f"{tok_file}: invalid JSON"):
        load_tokenizer(tmp_path)
    tok_file.write_text(original, encoding="utf-8")
    assert load_tokenizer(tmp_path).fingerprint == toks["unigram"].fingerprint

    meta = json.loads(meta_file.read_text())
    meta_file.write_text("{not json")
    with pytest.raises(UserError, match=f"{meta_file}: invalid JSON"):
        load_tokenizer(tmp_path)
    meta_file.write_text(json.dumps({**meta, "algo": "bytes"}))
    with pytest.raises(UserError, match="field 'algo': unknown algo 'bytes'"):
        load_tokenizer(tmp_path)
    meta_file.write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(UserError, match="field 'format_version'"):
        load_tokenizer(tmp_path)
    meta_file.write_text(json.dumps({**meta, "vocab_size": 7}))
    with pytest.raises(UserError, match="says 7"):
        load_tokenizer(tmp_path)
    meta_file.unlink()
    with pytest.raises(UserError, match=f"{META_FILE}: file not found"):
        load_tokenizer(tmp_path)


def test_decode_rejects_ids_outside_vocab(toks: dict[str, Tokenizer]) -> None:
    with pytest.raises(ValueError, match="outside the vocab"):
        toks["bpe"].decode([5, 512])
