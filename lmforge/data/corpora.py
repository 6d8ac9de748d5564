"""Reading pretraining text: the built-in world, .txt, .jsonl, .parquet, folders, HF datasets.

Everything is read and validated before any output is written, so bad input fails fast with
one line naming the file, line and field. The corpus is held in memory as a list of documents,
which suits the laptop-to-single-node scale this stage targets; token shards on disk (see
`shards.py`) are what training reads.

Held-out text comes from, in order of preference: `data.val_inputs`; the world's own held-out
split; otherwise the last `val_fraction` of the training characters (as nanoGPT splits
Shakespeare: first 90% train, last 10% validation).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lmforge.config import check, opt
from lmforge.data.world import WorldConfig, generate_corpus
from lmforge.errors import UserError, where

SUFFIXES = (".txt", ".jsonl", ".parquet")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    inputs: tuple[str, ...] = opt(
        ("world",),
        "training text: 'world', .txt/.jsonl/.parquet files, folders of them, "
        "or hf:NAME[:SPLIT] (needs the 'datasets' extra); comma-separated on the command line",
    )
    val_inputs: tuple[str, ...] = opt(
        (), "held-out text in the same forms; empty: the world's split or the last val_fraction"
    )
    val_fraction: float = opt(0.1, "share of training characters held out when no val_inputs")
    text_field: str = opt("text", "field that holds the text in .jsonl, .parquet and datasets")
    txt_docs: Literal["file", "paragraph", "line"] = opt(
        "file", "how a .txt file splits into documents (an end-of-text token follows each)"
    )
    world: WorldConfig = opt(WorldConfig(), "the built-in task world, for the input 'world'")
    cache_dir: str = opt(
        "", "cache for tokenizers and token shards; empty: $LMFORGE_CACHE or ~/.cache/lmforge"
    )

    def __post_init__(self) -> None:
        check(len(self.inputs) > 0, "inputs", "give at least one input (or 'world')")
        check(0 < self.val_fraction < 1, "val_fraction", "must be in (0, 1)")
        check(bool(self.text_field), "text_field", "must not be empty")


@dataclass(frozen=True)
class Corpus:
    train: list[str]
    val: list[str]
    fingerprint: str  # sha256 of the exact text, split and all: the cache key for shards


def load_corpus(cfg: DataConfig) -> Corpus:
    """Read and validate every input; split off held-out text."""
    train: list[str] = []
    world_val: list[str] = []
    for spec in cfg.inputs:
        if spec == "world":
            world = generate_corpus(cfg.world)
            train += world.train
            world_val += world.val
        else:
            train += list(_read_spec(spec, cfg))
    if not any(train):
        raise UserError(f"data.inputs: no text found in {', '.join(cfg.inputs)} (empty corpus)")
    if cfg.val_inputs:
        val = [d for spec in cfg.val_inputs for d in _read_spec(spec, cfg)]
        if not any(val):
            raise UserError(f"data.val_inputs: no text found in {', '.join(cfg.val_inputs)}")
    elif world_val and all(s == "world" for s in cfg.inputs):
        val = world_val
    else:
        train, val = _split_tail(train, cfg.val_fraction)
        val = world_val + val
    h = hashlib.sha256()
    for name, docs in (("train", train), ("val", val)):
        h.update(f"{name}:{len(docs)}\n".encode())
        for d in docs:
            h.update(len(d).to_bytes(8, "little"))
            h.update(d.encode("utf-8"))
    return Corpus(train=train, val=val, fingerprint=h.hexdigest())


def _split_tail(docs: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """Hold out the last `fraction` of characters, cutting the straddling document."""
    total = sum(len(d) for d in docs)
    need = int(total * fraction)
    if total < 2 or need == 0:
        raise UserError(
            f"data.inputs: corpus of {total} characters is too small to hold out "
            f"val_fraction={fraction}; give data.val_inputs"
        )
    train, val = list(docs), list[str]()
    while need > 0:
        last = train.pop()
        if len(last) <= need:
            val.insert(0, last)
            need -= len(last)
        else:
            train.append(last[: len(last) - need])
            val.insert(0, last[len(last) - need :])
            need = 0
    return train, val


def _read_spec(spec: str, cfg: DataConfig) -> Iterator[str]:
    if spec.startswith("hf:"):
        yield from _read_hf(spec[3:], cfg.text_field)
        return
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        if not files:
            raise UserError(f"{path}: folder holds no {'/'.join(SUFFIXES)} files")
        for f in files:
            yield from _read_file(f, cfg)
    elif path.is_file():
        yield from _read_file(path, cfg)
    else:
        raise UserError(f"{path}: no such file or folder")


def _read_file(path: Path, cfg: DataConfig) -> Iterator[str]:
    if path.suffix == ".txt":
        yield from _split_txt(read_utf8(path), cfg.txt_docs)
    elif path.suffix == ".jsonl":
        yield from _read_jsonl(path, cfg.text_field)
    elif path.suffix == ".parquet":
        yield from _read_parquet(path, cfg.text_field)
    else:
        raise UserError(f"{path}: unsupported file type (use {', '.join(SUFFIXES)})")


def read_utf8(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise UserError(f"{where(path, line)}: not valid UTF-8 (byte offset {e.start})") from None


def _split_txt(text: str, mode: str) -> Iterator[str]:
    if mode == "file":
        yield from [text] if text else []
        return
    text = text.replace("\r\n", "\n")
    if mode == "line":
        yield from (line for line in text.split("\n") if line.strip())
    else:
        yield from (p.strip("\n") for p in text.split("\n\n") if p.strip())


class BadJSON(ValueError):
    """Text that is not one JSON value lmforge can hold; `line` counts from the text's start."""

    def __init__(self, message: str, line: int) -> None:
        super().__init__(message)
        self.message, self.line = message, line


_DECODER = json.JSONDecoder()
# A \uD800-\uDFFF escape: half of a UTF-16 pair, which json decodes to a lone surrogate that
# no UTF-8 text can hold (it would fail later, when the text is tokenized or written).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def parse_json(text: str, start: int | None = None) -> tuple[object, int]:
    """`json.loads(text)` (`start` None) or the one value at `start` (raw_decode), with the
    offset after it. Everything json or Python refuses becomes `BadJSON`: syntax, nesting too
    deep for the parser's recursion, integers past Python's digit limit, lone surrogates."""

    def line() -> int:  # counted only on failure: arrays call this once per element
        return text.count("\n", 0, start or 0) + 1

    try:
        if start is None:
            value, end = json.loads(text), len(text)
        else:
            value, end = _DECODER.raw_decode(text, start)
    except json.JSONDecodeError as e:
        raise BadJSON(e.msg, e.lineno) from None
    except RecursionError:
        raise BadJSON("nested too deeply", line()) from None
    except ValueError:  # int("9" * 5000) is refused past sys.get_int_max_str_digits()
        raise BadJSON("a number too long", line()) from None
    if _SURROGATE_ESCAPE.search(text, start or 0, end):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise BadJSON("a lone surrogate escape (\\ud800-\\udfff) is not text", line()) from None
    return value, end


def read_jsonl(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, value) for each non-blank line of a JSONL file."""
    # Editors on Windows often save a byte-order mark, which json refuses; it holds no text.
    text = read_utf8(path).removeprefix("\ufeff")
    # Split on \n only: str.splitlines would also cut at U+2028/U+0085 inside JSON strings.
    for i, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value, _ = parse_json(line)
        except BadJSON as e:
            raise UserError(f"{where(path, i)}: invalid JSON ({e.message})") from None
        yield i, value


def _read_jsonl(path: Path, field: str) -> Iterator[str]:
    for i, rec in read_jsonl(path):
        if not isinstance(rec, dict):
            raise UserError(f"{where(path, i)}: expected a JSON object")
        if field not in rec:
            raise UserError(f"{where(path, i, field)}: missing (set data.text_field)")
        text = rec[field]
        if not isinstance(text, str):
            raise UserError(f"{where(path, i, field)}: expected a string")
        if text:
            yield text


def _read_parquet(path: Path, field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise UserError(f"{path}: cannot read parquet ({e})") from None
    if field not in table.column_names:
        raise UserError(f"{where(path, field=field)}: no such column (has {table.column_names})")
    for i, text in enumerate(table.column(field).to_pylist(), start=1):
        if not isinstance(text, str):
            raise UserError(f"{path}: row {i}: field '{field}': expected a string")
        if text:
            yield text


def _read_hf(name: str, field: str) -> Iterator[str]:
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        raise UserError(
            f"hf:{name}: Hugging Face datasets need the extra: pip install 'lmforge[datasets]'"
        ) from None
    repo, _, split = name.partition(":")
    try:
        ds = datasets.load_dataset(repo, split=split or "train")
    except Exception as e:  # network, missing dataset, bad split: all user-facing
        raise UserError(f"hf:{name}: cannot load dataset ({e})") from None
    if field not in ds.column_names:
        raise UserError(f"hf:{name}: field '{field}': no such column (has {ds.column_names})")
    for text in ds[field]:
        if isinstance(text, str) and text:
            yield text
