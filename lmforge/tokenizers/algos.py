"""The table of tokenizer algorithms: how each one is built, trained and made exact.

`ALGOS` maps a name to an `Algo`: a training function that returns a finished Hugging Face
tokenizer (the 9 `SPECIAL_TOKENS` at ids 0..8, registered as never-split added tokens), the
smallest vocabulary it can work with, and its word-start rule for whole-word masking.

Every algorithm round-trips any str exactly (`decode(encode(s)) == s`): there are no
normalizers, and each one can spell every byte or character, so no text ever becomes `<|unk|>`.

- `bpe`: byte-level BPE as in GPT-2 (Sennrich et al. 2016; Radford et al. 2019). ByteLevel
  pre-tokenizer with the GPT-2 regex and no prefix space, all 256 bytes in the alphabet.
- `wordpiece`: WordPiece with BERT's "##" continuation pieces (Schuster & Nakajima 2012; Devlin
  et al. 2019), run over byte-level words instead of BERT's lossy lowercase/strip pipeline, so it is
  exact; every byte exists both as a word start and as a "##" piece. Two extra splits keep "##"
  unambiguous and WordPiece fast: each "#" is a word of its own (so a word-start token never
  begins with "##"), and words are cut into chunks of at most 100 bytes (WordPiece's greedy
  longest match is cubic in word length).
- `unigram`: a Unigram language model as in SentencePiece (Kudo 2018), words split before each
  "▁" (the SentencePiece space marker; no dummy prefix) and byte fallback `<0x00>..<0xFF>` for
  characters outside the vocabulary; like SentencePiece's character_coverage, rare characters
  are left to byte fallback rather than given pieces. SentencePiece's Metaspace mapping is lossy
  (a literal "▁" in the text decodes as a space), so the wrapper swaps " " and "▁" before
  encoding and after decoding: a bijection that leaves ordinary text looking like Metaspace's.
- `char`: one token per character seen in training (at least `min_frequency` times), most
  frequent first, plus byte-fallback tokens for every other character: a BPE model without merges.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

SPECIAL_TOKENS = (
    "<|pad|>",
    "<|bos|>",
    "<|eos|>",
    "<|unk|>",
    "<|mask|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end_of_turn|>",
)
UNK = "<|unk|>"
N_SPECIAL = len(SPECIAL_TOKENS)
BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))  # the names byte fallback looks up


def special_added_tokens() -> list[AddedToken]:
    """The specials as HF added tokens that match raw text and never eat nearby whitespace."""
    return [
        AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)
        for t in SPECIAL_TOKENS
    ]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte (the map behind HF's ByteLevel)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    out, n = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + n)
            n += 1
    return out


BYTE_CHAR = _bytes_to_unicode()
CHAR_BYTE = {c: b for b, c in BYTE_CHAR.items()}
_WHITESPACE_BYTES = frozenset(b" \t\n\r\x0b\x0c")


@dataclass(frozen=True)
class Algo:
    """One tokenizer algorithm; `train(texts, vocab_size, min_frequency, show_progress)`."""

    train: Callable[[Iterator[str], int, int, bool], HFTokenizer]
    min_vocab: int
    min_vocab_why: str  # what the minimum is made of, for the "too small" error
    is_word_start: Callable[[str], bool]  # on a non-special token's string
    # Applied to text before the HF tokenizer sees it and to its decoded output; both identity
    # except for unigram's space/"▁" swap.
    to_model_text: Callable[[str], str] = lambda s: s
    from_model_text: Callable[[str], str] = lambda s: s


# --------------------------------------------------------------------------------------------
# bpe


def _train_bpe(texts: Iterator[str], vocab_size: int, min_freq: int, progress: bool) -> HFTokenizer:
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_freq,
        show_progress=progress,
        special_tokens=special_added_tokens(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    hf.train_from_iterator(texts, trainer)
    return hf


def _bpe_word_start(token: str) -> bool:
    # RoBERTa's convention: a word starts with whitespace ("Ġword"). Text glued to a word
    # (punctuation, the first word of a text) counts as a continuation.
    return CHAR_BYTE.get(token[0], -1) in _WHITESPACE_BYTES


# --------------------------------------------------------------------------------------------
# wordpiece

_WP_MAX_WORD = 100  # bytes per word chunk; also BERT's max_input_chars_per_word


def _wordpiece_parts() -> tuple[pre_tokenizers.PreTokenizer, decoders.Decoder]:
    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("#", behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            pre_tokenizers.Split(Regex(f".{{1,{_WP_MAX_WORD}}}"), behavior="isolated"),
        ]
    )
    # Word-start tokens never contain "#" next to anything, so deleting every "##" removes
    # exactly the continuation prefixes ("###" is the piece "##" + "#"); no spaces are added.
    dec = decoders.Sequence([decoders.Replace("##", ""), decoders.ByteLevel()])
    return pre, dec


def _train_wordpiece(
    texts: Iterator[str], vocab_size: int, min_freq: int, progress: bool
) -> HFTokenizer:
    pre, dec = _wordpiece_parts()
    hf = HFTokenizer(models.WordPiece(unk_token=UNK, max_input_chars_per_word=_WP_MAX_WORD))
    hf.pre_tokenizer = pre
    # WordPiece turns a whole word into <|unk|> when one piece is missing, and the trainer only
    # creates "##b" for bytes it sees inside words, numbered in hash-map order (which makes
    # training nondeterministic, huggingface/tokenizers#1794). Declaring every "##b" up front as
    # a trainer "special" fixes both; the vocab is rebuilt below with only the real specials.
    starts = [BYTE_CHAR[b] for b in range(256)]
    continuations = ["##" + c for c in starts]
    base = [*SPECIAL_TOKENS, *starts, *continuations]
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_freq,
        show_progress=progress,
        special_tokens=[*SPECIAL_TOKENS, *continuations],
        initial_alphabet=starts,
        continuing_subword_prefix="##",
    )
    hf.train_from_iterator(texts, trainer)
    known = set(base)
    learned = [t for t, _ in sorted(hf.get_vocab().items(), key=lambda kv: kv[1]) if t not in known]
    vocab = base + learned[: vocab_size - len(base)]
    out = HFTokenizer(
        models.WordPiece(
            vocab={t: i for i, t in enumerate(vocab)},
            unk_token=UNK,
            max_input_chars_per_word=_WP_MAX_WORD,
        )
    )
    out.pre_tokenizer, out.decoder = pre, dec
    out.add_special_tokens(special_added_tokens())
    return out


# --------------------------------------------------------------------------------------------
# unigram

_SPACE_MARK = "▁"  # U+2581, SentencePiece's visible space
# Byte-token and special names must be spellable from ordinary pieces, see _train_unigram.
_UNIGRAM_CHARS = tuple(sorted(set("".join(SPECIAL_TOKENS) + "".join(BYTE_TOKENS))))
# Score of the special and byte tokens. HF's Unigram matches every vocab entry against the
# text, so "<0x41>" or "<|eos|>" written as plain text could come back as that token. With this
# score spelling the name out always wins: it has at most 15 characters, all in the vocab with
# ordinary log-probabilities (> -100 each).
_UNREACHABLE = -1e6
_UNIGRAM_MIN = N_SPECIAL + 256 + len(_UNIGRAM_CHARS)


def _swap_space(text: str) -> str:
    """Exchange " " and "▁" (its own inverse); split/replace/join keep it at C speed."""
    if _SPACE_MARK not in text:
        return text.replace(" ", _SPACE_MARK)
    return _SPACE_MARK.join(part.replace(_SPACE_MARK, " ") for part in text.split(" "))


def _unigram_parts() -> tuple[pre_tokenizers.PreTokenizer, decoders.Decoder]:
    pre = pre_tokenizers.Split(_SPACE_MARK, behavior="merged_with_next")
    return pre, decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])


def _train_unigram(
    texts: Iterator[str], vocab_size: int, min_freq: int, progress: bool
) -> HFTokenizer:
    # HF's trainer must keep every character it sees and fails when they outnumber
    # vocab_size. Like SentencePiece's character_coverage, leave rare characters to byte
    # fallback: keep those seen >= min_freq times, most frequent first, in at most half the
    # free room, and cut the training texts at the others. This reads the corpus twice, so it
    # is held in memory (HF's trainer holds its words anyway).
    corpus = list(texts)
    counts: Counter[str] = Counter()
    for text in corpus:
        counts.update(text)
    room = (vocab_size - _UNIGRAM_MIN) // 2
    ranked = sorted((c for c, n in counts.items() if n >= min_freq), key=lambda c: (-counts[c], c))
    kept = set(_UNIGRAM_CHARS) | set(ranked[:room])
    rare = sorted(set(counts) - kept)
    if rare:
        cut = re.compile("[" + "".join(map(re.escape, rare)) + "]+")
        corpus = [piece for text in corpus for piece in cut.split(text) if piece]

    pre, dec = _unigram_parts()
    hf = HFTokenizer(models.Unigram())
    hf.pre_tokenizer = pre
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size - 256,  # room for the byte tokens added below
        show_progress=progress,
        special_tokens=special_added_tokens(),
        unk_token=UNK,
        initial_alphabet=list(_UNIGRAM_CHARS),
    )
    hf.train_from_iterator(corpus, trainer)
    reserved = set(SPECIAL_TOKENS) | set(BYTE_TOKENS)
    trained = json.loads(hf.to_str())["model"]["vocab"]
    pieces = _canonical_pieces([(p, s) for p, s in trained if p not in reserved])
    budget = vocab_size - N_SPECIAL - 256
    if len(pieces) > budget:  # HF overshoots when required characters fill its whole budget
        others = [p for p, _ in pieces if p not in _UNIGRAM_CHARS][: budget - len(_UNIGRAM_CHARS)]
        keep = set(_UNIGRAM_CHARS) | set(others)
        pieces = [ps for ps in pieces if ps[0] in keep]
    vocab = [(t, _UNREACHABLE) for t in (*SPECIAL_TOKENS, *BYTE_TOKENS)] + pieces
    out = HFTokenizer(models.Unigram(vocab, SPECIAL_TOKENS.index(UNK), True))
    out.pre_tokenizer, out.decoder = pre, dec
    out.add_special_tokens(special_added_tokens())
    return out


def _canonical_pieces(pieces: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """Remove the run-to-run noise of HF's Unigram trainer from its pieces and their order.

    Two sources: characters the EM dropped are re-added at `min_score + k * 1e-4` with k in
    hash-set order (they all get the floor score here), and the E-step sums sentences in
    hash-map order, moving scores by ~1e-15 (rounded off to 1e-6). Ties sort by piece.
    """
    floor = min(s for _, s in pieces)
    n_chars = sum(len(p) == 1 for p, _ in pieces)
    readded = floor + 1e-4 * n_chars + 1e-9
    canon = [(p, floor if len(p) == 1 and s <= readded else s) for p, s in pieces]
    return sorted(((p, round(s, 6)) for p, s in canon), key=lambda ps: (-ps[1], ps[0]))


# --------------------------------------------------------------------------------------------
# char


def _train_char(
    texts: Iterator[str], vocab_size: int, min_freq: int, progress: bool
) -> HFTokenizer:
    del progress  # counting characters needs no progress bar
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(text)
    seen = sorted((c for c, n in counts.items() if n >= min_freq), key=lambda c: (-counts[c], c))
    vocab = [*SPECIAL_TOKENS, *BYTE_TOKENS, *seen[: vocab_size - N_SPECIAL - 256]]
    # A BPE model with no merges never joins characters, so it can only emit single
    # characters, byte tokens for the rest, and the specials through the added vocabulary.
    model = models.BPE(
        vocab={t: i for i, t in enumerate(vocab)}, merges=[], unk_token=UNK, byte_fallback=True
    )
    hf = HFTokenizer(model)
    hf.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    hf.add_special_tokens(special_added_tokens())
    return hf


# UTF-8 continuation bytes (10xxxxxx) never start a character.
_CONTINUATION_BYTE_TOKENS = frozenset(BYTE_TOKENS[0x80:0xC0])


ALGOS: dict[str, Algo] = {
    "bpe": Algo(
        train=_train_bpe,
        min_vocab=N_SPECIAL + 256,
        min_vocab_why=f"{N_SPECIAL} special tokens + 256 bytes",
        is_word_start=_bpe_word_start,
    ),
    "wordpiece": Algo(
        train=_train_wordpiece,
        min_vocab=N_SPECIAL + 512,
        min_vocab_why=f"{N_SPECIAL} special tokens + 256 bytes + 256 '##' bytes",
        is_word_start=lambda t: not t.startswith("##"),
    ),
    "unigram": Algo(
        train=_train_unigram,
        min_vocab=_UNIGRAM_MIN,
        min_vocab_why=(
            f"{N_SPECIAL} special tokens + 256 byte-fallback tokens + "
            f"{len(_UNIGRAM_CHARS)} characters that spell them"
        ),
        is_word_start=lambda t: t.startswith(_SPACE_MARK),
        to_model_text=_swap_space,
        from_model_text=_swap_space,
    ),
    "char": Algo(
        train=_train_char,
        min_vocab=N_SPECIAL + 256,
        min_vocab_why=f"{N_SPECIAL} special tokens + 256 byte-fallback tokens",
        # Every character is its own "word"; only the tail bytes of a byte-spelt one are not.
        is_word_start=lambda t: t not in _CONTINUATION_BYTE_TOKENS,
    ),
}
