"""Token shards: a corpus tokenized once into memory-mapped arrays on disk.

Each split is one flat array of token ids (uint16 when the vocabulary fits, else uint32) with
an end-of-text token after every document, plus the start offset of every document. Special
tokens spelt inside a document are encoded as text, so the data can never forge them. Shards are
cached under a key made of the corpus text's hash and the tokenizer's fingerprint, so
re-running a stage on unchanged input skips tokenization. The cache entry is built in a
temporary folder and renamed when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lmforge.data.corpora import Corpus
from lmforge.io import atomic_dir
from lmforge.tokenizers import Tokenizer

SHARD_FORMAT = 2  # 2: special-token spellings in documents are text (1 read them as specials)
_BATCH_DOCS = 256


@dataclass(frozen=True)
class TokenSplit:
    tokens: np.ndarray  # (N,) memory-mapped token ids
    doc_starts: np.ndarray  # (n_docs,) offset of each document's first token
    n_bytes: int  # UTF-8 bytes of the text these tokens encode, for bits per byte

    @property
    def tokens_per_byte(self) -> float:
        return len(self.tokens) / max(1, self.n_bytes)


@dataclass(frozen=True)
class TokenData:
    train: TokenSplit
    val: TokenSplit
    reused: bool  # True when the cache already held these shards


def cache_root(cache_dir: str) -> Path:
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get("LMFORGE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lmforge"


def build_shards(
    corpus: Corpus, tokenizer: Tokenizer, cache_dir: str, progress: bool = True
) -> TokenData:
    """Tokenize `corpus` into cached shards, or reuse them if already there."""
    key = hashlib.sha256(
        f"{SHARD_FORMAT}:{corpus.fingerprint}:{tokenizer.fingerprint}".encode()
    ).hexdigest()[:24]
    root = cache_root(cache_dir) / "shards"
    path = root / key
    reused = (path / "meta.json").is_file()
    if not reused:
        root.mkdir(parents=True, exist_ok=True)
        with atomic_dir(path) as tmp:
            dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
            meta: dict[str, object] = {"format": SHARD_FORMAT, "dtype": np.dtype(dtype).name}
            for name, docs in (("train", corpus.train), ("val", corpus.val)):
                meta[name] = _write_split(tmp, name, docs, tokenizer, dtype, progress)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return load_shards(path, reused)


def load_shards(path: Path, reused: bool = True) -> TokenData:
    meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    dtype = np.dtype(meta["dtype"])

    def split(name: str) -> TokenSplit:
        n = meta[name]["n_tokens"]
        tokens = (
            np.memmap(path / f"{name}.bin", dtype=dtype, mode="r", shape=(n,))
            if n
            else np.zeros(0, dtype=dtype)
        )
        starts = np.load(path / f"{name}.docs.npy", allow_pickle=False)
        return TokenSplit(tokens=tokens, doc_starts=starts, n_bytes=meta[name]["n_bytes"])

    return TokenData(train=split("train"), val=split("val"), reused=reused)


def _write_split(
    out: Path, name: str, docs: list[str], tok: Tokenizer, dtype: type, progress: bool
) -> dict[str, int]:
    starts: list[int] = []
    n_tokens = n_bytes = 0
    bar = tqdm(
        total=len(docs), desc=f"tokenizing {name}", unit="doc", disable=not progress, leave=False
    )
    with open(out / f"{name}.bin", "wb") as f:
        for i in range(0, len(docs), _BATCH_DOCS):
            chunk = docs[i : i + _BATCH_DOCS]
            # Document text is data: "<|eos|>" written in it stays text, never a special id.
            for ids in tok.encode_batch(chunk, add_eos=True, allow_special=False):
                starts.append(n_tokens)
                n_tokens += len(ids)
                f.write(np.asarray(ids, dtype=dtype).tobytes())
            n_bytes += sum(len(d.encode("utf-8")) for d in chunk)
            bar.update(len(chunk))
    bar.close()
    np.save(out / f"{name}.docs.npy", np.asarray(starts, dtype=np.int64), allow_pickle=False)
    return {"n_tokens": n_tokens, "n_docs": len(docs), "n_bytes": n_bytes}
