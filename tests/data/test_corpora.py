from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmforge import config as C
from lmforge.data.corpora import Corpus, DataConfig, load_corpus
from lmforge.data.packing import BlockSampler, eval_blocks
from lmforge.data.shards import build_shards
from lmforge.errors import UserError
from lmforge.tokenizers import SPECIAL_TOKENS, train_tokenizer


def data(**kw: object) -> DataConfig:
    return C.build(DataConfig, kw)


def test_all_file_kinds_and_folders(tmp_path: Path) -> None:
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("para one\n\npara two\n")
    (folder / "b.jsonl").write_text(json.dumps({"body": "json doc"}) + "\n\n")
    pq.write_table(pa.table({"body": ["pq doc 1", "pq doc 2"]}), folder / "c.parquet")
    (folder / "skip.md").write_text("ignored")
    val = tmp_path / "val.txt"
    val.write_text("held out")
    corpus = load_corpus(
        data(inputs=[str(folder)], val_inputs=[str(val)], text_field="body", txt_docs="paragraph")
    )
    assert corpus.train == ["para one", "para two", "json doc", "pq doc 1", "pq doc 2"]
    assert corpus.val == ["held out"]


def test_tail_split_is_exact_by_characters(tmp_path: Path) -> None:
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    (tmp_path / "t.txt").write_text(text)
    corpus = load_corpus(data(inputs=[str(tmp_path / "t.txt")], val_fraction=0.1))
    assert corpus.train == [text[:900]] and corpus.val == [text[900:]]


def test_world_uses_its_own_split_and_fingerprint_tracks_content(tmp_path: Path) -> None:
    a = load_corpus(data(world={"n_docs": 200}))
    b = load_corpus(data(world={"n_docs": 200, "seed": 1}))
    assert len(a.val) == 10 and not set(a.val) & set(a.train)
    assert a.fingerprint != b.fingerprint
    assert a.fingerprint == load_corpus(data(world={"n_docs": 200})).fingerprint


def test_parquet_missing_column_is_named(tmp_path: Path) -> None:
    pq.write_table(pa.table({"other": ["x"]}), tmp_path / "c.parquet")
    with pytest.raises(UserError, match=r"c.parquet: field 'text': no such column"):
        load_corpus(data(inputs=[str(tmp_path / "c.parquet")]))


def test_shards_are_cached_and_hold_every_document(tmp_path: Path) -> None:
    corpus = load_corpus(data(world={"n_docs": 300}))
    tok = train_tokenizer("bpe", corpus.train, 400)
    first = build_shards(corpus, tok, str(tmp_path), progress=False)
    again = build_shards(corpus, tok, str(tmp_path), progress=False)
    assert not first.reused and again.reused
    assert first.train.tokens.dtype == np.uint16
    assert len(first.train.doc_starts) == len(corpus.train)
    # Each document decodes back from its slice, followed by end-of-text.
    starts = list(first.train.doc_starts) + [len(first.train.tokens)]
    for i in (0, 7, len(corpus.train) - 1):
        ids = first.train.tokens[starts[i] : starts[i + 1]].tolist()
        assert ids[-1] == tok.eos_id and tok.decode(ids[:-1]) == corpus.train[i]


def test_document_text_spelling_a_special_token_stays_text(tmp_path: Path) -> None:
    """A corpus is data: "<|eos|>" written in a document is never the end-of-text id, so only
    the separator after each document is (web text often holds GPT-2's "<|endoftext|>")."""
    docs = ["plain story one", *(f"a {s} b" for s in SPECIAL_TOKENS), "<|eos|><|eos|>"]
    corpus = Corpus(train=docs, val=docs[:2], fingerprint="specials-as-text")
    tok = train_tokenizer("bpe", docs * 5, 300)
    shards = build_shards(corpus, tok, str(tmp_path), progress=False)
    tokens = shards.train.tokens.tolist()
    assert {t for t in tokens if t < len(SPECIAL_TOKENS)} == {tok.eos_id}
    assert tokens.count(tok.eos_id) == len(docs)


def test_sampler_covers_each_block_once_per_epoch_and_is_stateless() -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    s = BlockSampler(tokens, block_size=10, seed=3)
    n = s.n_blocks
    x, y = s.batch(0, n)
    assert sorted(x[:, 0].tolist()) == [10 * i for i in range(n)]  # epoch 0: offset 0
    assert (y == x + 1).all()
    x2, _ = s.batch(n, n)  # epoch 1: shifted cut, still every block once
    offsets = {int(v) % 10 for v in x2[:, 0]}
    assert len(offsets) == 1 and len(set(x2[:, 0].tolist())) == n
    fresh = BlockSampler(tokens, block_size=10, seed=3)
    assert (fresh.batch(n + 5, 4)[0] == s.batch(n + 5, 4)[0]).all()  # pure function of index
    assert int(x2.max()) + 1 < len(tokens)


def test_too_little_text_for_a_block() -> None:
    with pytest.raises(UserError, match="too few for one block"):
        BlockSampler(np.arange(50, dtype=np.uint16), block_size=64, seed=0)
    with pytest.raises(UserError, match="validation split"):
        eval_blocks(np.arange(10, dtype=np.uint16), 64, 8)


def test_jsonl_text_may_hold_unicode_line_separators(tmp_path: Path) -> None:
    f = tmp_path / "c.jsonl"
    texts = ["one\u2028two", "three\u0085four", "crlf line"]
    f.write_text("\r\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in texts))
    corpus = load_corpus(data(inputs=[str(f)], val_inputs=[str(f)]))
    assert corpus.train == texts


def test_paragraphs_split_in_crlf_files_too(tmp_path: Path) -> None:
    f = tmp_path / "p.txt"
    f.write_bytes(b"para one\r\n\r\npara two\r\n")
    corpus = load_corpus(data(inputs=[str(f)], val_inputs=[str(f)], txt_docs="paragraph"))
    assert corpus.train == ["para one", "para two"]
    whole = load_corpus(data(inputs=[str(f)], val_inputs=[str(f)]))
    assert whole.train == ["para one\r\n\r\npara two\r\n"]
