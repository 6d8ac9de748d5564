"""The tokenizer options a stage exposes (`tokenizer.algo`, `tokenizer.vocab_size`, ...)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lmforge.config import check, opt


@dataclass(frozen=True, kw_only=True)
class TokenizerConfig:
    algo: Literal["bpe", "wordpiece", "unigram", "char"] = opt(
        "bpe", "algorithm: byte-level BPE, WordPiece, Unigram (SentencePiece) or characters"
    )
    vocab_size: int = opt(2048, "vocabulary size including special tokens (char: an upper bound)")
    path: str = opt("", "use this trained tokenizer folder instead of training a new one")

    def __post_init__(self) -> None:
        check(self.vocab_size >= 1, "vocab_size", f"must be >= 1 (got {self.vocab_size})")
