"""The `Tokenizer` wrapper, training entry point, and the tokenizer artefact (save/load).

A trained tokenizer is one Hugging Face `tokenizer.json` plus `tokenizer_meta.json` (algo,
vocab size, special ids, fingerprint, format version). The fingerprint is the sha256 of the exact
`tokenizer.json` bytes, so it is stable across save/load and checkpoints can record which
tokenizer they were trained with. Both files are written atomically (temp file, then rename).

Vocab size semantics: `vocab_size` counts every token, the 9 specials included. bpe, wordpiece
and unigram reach it exactly when the corpus has enough material and stop short otherwise (too
few pairs seen `min_frequency` times to merge, too few distinct substrings for Unigram). For
char it is a cap: specials + 256 byte tokens + the most frequent characters seen at least
`min_frequency` times, as many as fit.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from lmforge.errors import UserError, where
from lmforge.io import atomic_write_text
from lmforge.tokenizers.algos import ALGOS, SPECIAL_TOKENS, Algo

FORMAT_VERSION = 1
TOKENIZER_FILE = "tokenizer.json"
META_FILE = "tokenizer_meta.json"
SPECIAL_NAMES = tuple(t.removeprefix("<|").removesuffix("|>") for t in SPECIAL_TOKENS)


class Tokenizer:
    """A trained tokenizer: exact encode/decode with the specials at fixed ids 0..8."""

    # The Jinja chat template of a tokenizer imported from Hugging Face; None means ours
    # (tokenizers/chat.py), built from the role tokens.
    chat_template: str | None = None

    def __init__(self, algo: str, tokenizer_json: str) -> None:
        """Wrap a serialized HF tokenizer; ValueError if it is not a valid lmforge one."""
        self._wrap(algo, _get_algo(algo), tokenizer_json)
        for i, tok in enumerate(SPECIAL_TOKENS):
            if self._hf.token_to_id(tok) != i:
                raise ValueError(f"special token {tok} must have id {i}")
        self.special_ids: dict[str, int] = {name: i for i, name in enumerate(SPECIAL_NAMES)}
        self.pad_id, self.bos_id, self.eos_id, self.unk_id, self.mask_id = range(5)

    def _wrap(self, algo: str, spec: Algo, tokenizer_json: str) -> None:
        self.algo = algo
        self._algo: Algo = spec
        self._json = tokenizer_json
        self.fingerprint = hashlib.sha256(tokenizer_json.encode("utf-8")).hexdigest()
        try:
            self._hf = HFTokenizer.from_str(tokenizer_json)
            self._hf_plain = HFTokenizer.from_str(tokenizer_json)
        except Exception as e:  # HF raises a bare Exception
            raise ValueError(f"not a valid Hugging Face tokenizer: {e}") from None
        # A second copy that treats special-token strings as text, for untrusted input.
        self._hf_plain.encode_special_tokens = True
        self.vocab_size: int = self._hf.get_vocab_size(with_added_tokens=True)

    @functools.cached_property
    def word_starts(self) -> tuple[bool, ...]:
        """One flag per id, for whole-word masking (a tensor lookup later); specials start."""
        specials = set(self.special_ids.values())
        return tuple(
            i in specials or self._algo.is_word_start(self.id_to_token(i))
            for i in range(self.vocab_size)
        )

    def __repr__(self) -> str:
        return f"Tokenizer(algo={self.algo!r}, vocab_size={self.vocab_size})"

    @property
    def json(self) -> str:
        """The serialized Hugging Face tokenizer (tokenizer.json) this one wraps."""
        return self._json

    def __reduce__(self) -> tuple[type[Tokenizer], tuple[str, str]]:
        # Pickle as (algo, json), e.g. for DataLoader workers: the algo table holds lambdas.
        return (Tokenizer, (self.algo, self._json))

    # ---- encoding and decoding

    def encode(
        self, text: str, *, add_bos: bool = False, add_eos: bool = False, allow_special: bool = True
    ) -> list[int]:
        """Token ids of `text`; with allow_special=False, "<|eos|>" etc. are plain text."""
        hf = self._hf if allow_special else self._hf_plain
        ids = hf.encode(self._algo.to_model_text(text), add_special_tokens=False).ids
        return self._frame(ids, add_bos, add_eos)

    def encode_batch(
        self,
        texts: list[str],
        *,
        add_bos: bool = False,
        add_eos: bool = False,
        allow_special: bool = True,
    ) -> list[list[int]]:
        """`encode` over many texts, in parallel inside HF (no offsets computed)."""
        hf = self._hf if allow_special else self._hf_plain
        model_texts = [self._algo.to_model_text(t) for t in texts]
        # encode_batch_fast skips offsets (tokenizers >= 0.20; the plain one before that).
        encode = getattr(hf, "encode_batch_fast", hf.encode_batch)
        encodings = encode(model_texts, add_special_tokens=False)
        return [self._frame(e.ids, add_bos, add_eos) for e in encodings]

    def _frame(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        return [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        """Text of `ids`, the exact inverse of `encode`; invalid UTF-8 bytes become U+FFFD."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocab (size {self.vocab_size})")
        text = self._hf.decode(ids, skip_special_tokens=skip_special)
        return self._algo.from_model_text(text)

    # ---- vocabulary

    def id_to_token(self, i: int) -> str:
        token = self._hf.id_to_token(i) if i >= 0 else None
        if token is None:
            raise IndexError(f"token id {i} is outside the vocab (size {self.vocab_size})")
        return token

    def token_to_id(self, s: str) -> int | None:
        return self._hf.token_to_id(s)

    def is_word_start(self, i: int) -> bool:
        """Whether token `i` begins a word (specials do); see each algo in `ALGOS`.

        Callers masking whole words should also treat the first token of a text as a start.
        """
        return self.word_starts[i]

    def bytes_per_token(self, texts: Iterable[str]) -> float:
        """Compression on held-out text: UTF-8 bytes per token (higher is better)."""
        texts = list(texts)
        n_tokens = sum(len(ids) for ids in self.encode_batch(texts, allow_special=False))
        if n_tokens == 0:
            raise UserError("bytes_per_token: no text given (all texts are empty)")
        return sum(len(t.encode("utf-8")) for t in texts) / n_tokens

    # ---- the artefact

    def _meta(self) -> dict[str, object]:
        return {
            "format": "lmforge-tokenizer",
            "format_version": FORMAT_VERSION,
            "algo": self.algo,
            "vocab_size": self.vocab_size,
            "special_ids": self.special_ids,
            "fingerprint": self.fingerprint,
        }

    def save(self, out_dir: Path) -> None:
        """Write tokenizer.json and tokenizer_meta.json into `out_dir` (created if needed)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        meta = self._meta()
        # tokenizer.json first: a crash in between leaves a fingerprint mismatch, not a
        # silently different tokenizer.
        atomic_write_text(out_dir / TOKENIZER_FILE, self._json)
        atomic_write_text(out_dir / META_FILE, json.dumps(meta, indent=2) + "\n")


# Imported tokenizers keep their own text handling; word starts only matter to masked-LM
# pretraining, which never uses them, so the common byte-level/SentencePiece marks serve.
_IMPORTED = Algo(
    train=lambda *_: _not_trainable(),
    min_vocab=0,
    min_vocab_why="",
    is_word_start=lambda t: t.startswith(("Ġ", "▁", " ")),
)
IMPORTED_SPECIALS = ("bos", "eos", "pad", "end_of_turn")


def _not_trainable() -> HFTokenizer:
    raise UserError("an imported Hugging Face tokenizer cannot be trained")


class ImportedTokenizer(Tokenizer):
    """A Hugging Face model's own tokenizer: its ids, its special tokens and its chat template.

    `specials` names the token strings playing our roles (IMPORTED_SPECIALS): bos, eos, pad and
    end_of_turn, where an assistant turn ends and generation stops. Built by
    `tokenizers.imported.load_hf_tokenizer`; saved and loaded like ours (algo "hf").
    """

    def __init__(self, tokenizer_json: str, specials: dict[str, str], chat_template: str) -> None:
        self._wrap("hf", _IMPORTED, tokenizer_json)
        ids = {}
        for name in IMPORTED_SPECIALS:
            token = specials.get(name)
            i = self._hf.token_to_id(token) if isinstance(token, str) else None
            if i is None:
                raise ValueError(f"special token {name}={token!r} is not in the vocabulary")
            ids[name] = i
        self.specials = {name: specials[name] for name in IMPORTED_SPECIALS}
        self.special_ids = ids
        self.pad_id, self.bos_id, self.eos_id = ids["pad"], ids["bos"], ids["eos"]
        # No unknown or mask token: imported tokenizers serve decoder post-training only.
        self.unk_id = self.mask_id = -1
        self.chat_template = chat_template

    def __repr__(self) -> str:
        return f"ImportedTokenizer(vocab_size={self.vocab_size})"

    def set_end_of_turn(self, token: str) -> None:
        """Use `token` as the end of an assistant turn (read off the template after loading)."""
        i = self._hf.token_to_id(token)
        if i is None:
            raise ValueError(f"special token end_of_turn={token!r} is not in the vocabulary")
        self.specials["end_of_turn"], self.special_ids["end_of_turn"] = token, i

    @functools.cached_property
    def added_special_ids(self) -> frozenset[int]:
        """Ids of the tokenizer's added tokens marked special (<|im_end|>, <|eot_id|>, ...)."""
        return frozenset(i for i, t in self._hf.get_added_tokens_decoder().items() if t.special)

    def __reduce__(self) -> tuple[type[Tokenizer], tuple[str, dict[str, str], str]]:  # type: ignore[override]
        return (ImportedTokenizer, (self._json, self.specials, self.chat_template or ""))

    def _meta(self) -> dict[str, object]:
        return {
            **super()._meta(),
            "special_tokens": self.specials,
            "chat_template": self.chat_template,
        }


# --------------------------------------------------------------------------------------------
# Training and loading


def _get_algo(algo: str) -> Algo:
    """The table entry for `algo`, or a UserError listing the valid names."""
    if algo not in ALGOS:
        raise UserError(f"unknown tokenizer algo '{algo}': choose one of {', '.join(ALGOS)}")
    return ALGOS[algo]


def min_vocab_size(algo: str) -> int:
    """The smallest vocab_size `algo` can be trained with."""
    return _get_algo(algo).min_vocab


def check_vocab_size(algo: str, vocab_size: int) -> None:
    """UserError unless `algo` can be trained with `vocab_size` (call before reading a corpus)."""
    spec = _get_algo(algo)
    if vocab_size < spec.min_vocab:
        raise UserError(
            f"vocab_size {vocab_size} is too small for {algo}: "
            f"it needs at least {spec.min_vocab} ({spec.min_vocab_why})"
        )


def train_tokenizer(
    algo: str,
    texts: Iterable[str],
    vocab_size: int,
    *,
    show_progress: bool = False,
    min_frequency: int = 2,
) -> Tokenizer:
    """Train `algo` on `texts` (read once; streamed, except unigram keeps them in memory).

    `min_frequency`: fewest occurrences for a bpe/wordpiece merge, or for a character to get a
    token of its own in char and unigram (rarer ones are spelt in bytes). Deterministic: the
    same texts and arguments give the same fingerprint.
    """
    check_vocab_size(algo, vocab_size)
    spec = _get_algo(algo)
    if min_frequency < 1:
        raise UserError(f"min_frequency must be >= 1 (got {min_frequency})")
    corpus = _non_empty(texts)
    hf = spec.train(map(spec.to_model_text, corpus), vocab_size, min_frequency, show_progress)
    return Tokenizer(algo, hf.to_str(pretty=True))


def _non_empty(texts: Iterable[str]) -> Iterator[str]:
    """`texts` without empty strings; UserError now if there is nothing to train on."""
    if isinstance(texts, str):
        raise UserError("training texts must be an iterable of strings, not one string")

    def checked(it: Iterable[object]) -> Iterator[str]:
        for t in it:
            if not isinstance(t, str):
                raise UserError(f"training texts must be strings (got {type(t).__name__})")
            if t:
                yield t

    stream = checked(texts)
    first = next(stream, None)
    if first is None:
        raise UserError("no training text: the corpus is empty (or only has empty strings)")

    def chained() -> Iterator[str]:
        yield first
        yield from stream

    return chained()


def load_tokenizer(path: str | Path, *, expected_vocab_size: int | None = None) -> Tokenizer:
    """Load a tokenizer saved by `Tokenizer.save` from its directory (or a file inside it)."""
    p = Path(path)
    folder = p.parent if p.is_file() else p
    if not folder.is_dir():
        raise UserError(f"{p}: tokenizer directory not found")
    tok_path, meta_path = folder / TOKENIZER_FILE, folder / META_FILE
    for f in (tok_path, meta_path):
        if not f.is_file():
            raise UserError(f"{f}: file not found (a tokenizer saved by lmforge has {f.name})")

    meta = _read_json(meta_path)
    if not isinstance(meta, dict):
        raise UserError(f"{meta_path}: expected a JSON object")
    for field in ("format_version", "algo", "vocab_size", "fingerprint"):
        if field not in meta:
            raise UserError(f"{where(meta_path, field=field)}: missing")
    if meta["format_version"] != FORMAT_VERSION:
        raise UserError(
            f"{where(meta_path, field='format_version')}: {meta['format_version']!r} is not "
            f"supported (this lmforge reads version {FORMAT_VERSION})"
        )
    if meta["algo"] not in ALGOS and meta["algo"] != "hf":
        raise UserError(
            f"{where(meta_path, field='algo')}: unknown algo {meta['algo']!r} "
            f"(known: {', '.join(ALGOS)})"
        )

    raw = tok_path.read_bytes()
    try:
        text = raw.decode("utf-8")
        json.loads(text)
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are both ValueErrors
        raise UserError(f"{tok_path}: invalid JSON: {e}") from None
    fingerprint = hashlib.sha256(raw).hexdigest()
    if fingerprint != meta["fingerprint"]:
        raise UserError(
            f"{tok_path}: fingerprint {fingerprint[:12]}… does not match the one in "
            f"{META_FILE} ({str(meta['fingerprint'])[:12]}…): the file was changed or mixed up"
        )
    try:
        if meta["algo"] == "hf":
            for field in ("special_tokens", "chat_template"):
                if not isinstance(meta.get(field), dict if field == "special_tokens" else str):
                    raise UserError(f"{where(meta_path, field=field)}: missing or malformed")
            tok: Tokenizer = ImportedTokenizer(text, meta["special_tokens"], meta["chat_template"])
        else:
            tok = Tokenizer(meta["algo"], text)
    except ValueError as e:
        raise UserError(f"{tok_path}: {e}") from None
    if tok.vocab_size != meta["vocab_size"]:
        raise UserError(
            f"{where(meta_path, field='vocab_size')}: says {meta['vocab_size']} but "
            f"{TOKENIZER_FILE} has {tok.vocab_size} tokens"
        )
    # Hugging Face models often pad their embedding past the tokenizer (Qwen2: to a multiple
    # of 128); ids beyond the tokenizer are then never produced by encoding.
    padded = (
        tok.algo == "hf"
        and expected_vocab_size is not None
        and tok.vocab_size < expected_vocab_size
    )
    if expected_vocab_size is not None and tok.vocab_size != expected_vocab_size and not padded:
        raise UserError(
            f"{folder}: tokenizer has {tok.vocab_size} tokens but the model expects "
            f"{expected_vocab_size} (vocab sizes must match)"
        )
    return tok


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise UserError(f"{path}: invalid JSON: {e}") from None
