"""Tokenizers: train, save and load exact (lossless) tokenizers on top of Hugging Face `tokenizers`.

`train_tokenizer(algo, texts, vocab_size)` with algo in `ALGOS` (bpe, wordpiece, unigram, char)
returns a `Tokenizer`; `Tokenizer.save(dir)` and `load_tokenizer(dir)` move it to and from disk.
Every algo keeps the `SPECIAL_TOKENS` at ids 0..8 and decodes any text back exactly.
"""

from lmforge.tokenizers.algos import ALGOS, SPECIAL_TOKENS
from lmforge.tokenizers.core import (
    META_FILE,
    SPECIAL_NAMES,
    TOKENIZER_FILE,
    ImportedTokenizer,
    Tokenizer,
    check_vocab_size,
    load_tokenizer,
    min_vocab_size,
    train_tokenizer,
)

__all__ = [
    "ALGOS",
    "META_FILE",
    "SPECIAL_NAMES",
    "SPECIAL_TOKENS",
    "TOKENIZER_FILE",
    "ImportedTokenizer",
    "Tokenizer",
    "check_vocab_size",
    "load_tokenizer",
    "min_vocab_size",
    "train_tokenizer",
]
