"""Reading instruction-tuning (SFT) data: every public format normalised to a conversation.

Supervised fine-tuning sets are published in a handful of shapes. Rather than ask users to
convert them, each record is recognised by its fields and turned into a `Conversation`: an
optional system prompt, then alternating user and assistant turns, ending with an assistant
turn. The formats, checked in this order (the first whose required fields are all present wins;
other fields such as ids, `category` or metadata are ignored):

- `chat`: `{"messages": [{"role": ..., "content": ...}, ...]}`, the OpenAI-style chat format
  (also used by ShareGPT conversions, UltraChat and most recent sets); multi-turn.
- `alpaca`: `{"instruction", "input"?, "output"}`, from Stanford Alpaca (Taori et al., 2023);
  a non-empty `input` is appended to the instruction after a blank line.
- `dolly`: `{"instruction", "context", "response"}`, from Databricks Dolly 15k; a non-empty
  `context` is appended to the instruction after a blank line.
- `prompt_completion`: `{"prompt", "completion"}`, either two strings (the OpenAI fine-tuning
  format) or two lists of messages (TRL's conversational prompt/completion format).

Files are `.jsonl` (one record per line) or `.json` (one top-level array); `hf:NAME[:SPLIT]`
reads a Hugging Face dataset. Everything is read and validated before returning, so bad data
fails before any model is built, with one line naming the file, line and field (message
indices such as `messages[2]` count from 0, as in JSON paths). Text is kept verbatim:
templates and tokenisation are decided later.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, TypeVar

from lmforge.data.corpora import BadJSON, parse_json, read_jsonl, read_utf8
from lmforge.errors import UserError, where

T = TypeVar("T")
ROLES = ("system", "user", "assistant")
SUFFIXES = (".jsonl", ".json")


@dataclass(frozen=True)
class Message:
    role: str  # one of ROLES
    content: str


@dataclass(frozen=True)
class Conversation:
    messages: tuple[Message, ...]  # [system], user, assistant, user, assistant, ...
    source: str  # "file:line" or "hf:NAME:row N", for messages about this record later


# A converter turns a record already known to hold its format's required fields into
# validated messages; `loc` is the "file:line" prefix for its errors.
Converter = Callable[[Mapping[str, object], str], tuple[Message, ...]]


class Format(NamedTuple):
    required: tuple[str, ...]  # all present: the record is in this format
    optional: tuple[str, ...]  # read when present; may be empty or null
    convert: Converter


EMPTY_RESPONSE = "empty response"
_EMPTY_TURN = {
    "system": "empty system prompt",
    "user": "empty user turn",
    "assistant": EMPTY_RESPONSE,
}


def json_kind(value: object) -> str:
    """The JSON name of a value's type, for "expected X, got Y" messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):  # before int: bool is an int subclass
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object" if isinstance(value, dict) else type(value).__name__


def _text(rec: Mapping[str, object], field: str, loc: str, if_empty: str | None) -> str:
    """A string field; `if_empty` is the error for a blank value, or None if blank is fine.

    A field that may be empty may also be null or absent: Parquet and HF exports write
    missing optional columns as null.
    """
    value = rec.get(field)
    if value is None and if_empty is None:
        return ""
    if not isinstance(value, str):
        raise UserError(f"{where(loc, field=field)}: expected a string, got {json_kind(value)}")
    if if_empty is not None and not value.strip():
        raise UserError(f"{where(loc, field=field)}: {if_empty}")
    return value


def _joined(first: str, extra: str) -> str:
    # Alpaca's and Dolly's own prompt templates put the extra text after a blank line.
    return f"{first}\n\n{extra}" if extra.strip() else first


def parse_message(raw: object, field: str, loc: str) -> Message:
    if not isinstance(raw, dict):
        raise UserError(
            f"{where(loc, field=field)}: expected an object with role and content, "
            f"got {json_kind(raw)}"
        )
    for key in ("role", "content"):
        if key not in raw:
            raise UserError(f"{where(loc, field=f'{field}.{key}')}: missing")
    role, content = raw["role"], raw["content"]
    if not isinstance(role, str):
        raise UserError(
            f"{where(loc, field=f'{field}.role')}: expected a string, got {json_kind(role)}"
        )
    if role not in ROLES:
        raise UserError(
            f"{where(loc, field=f'{field}.role')}: unknown role '{role}' (use {', '.join(ROLES)})"
        )
    if not isinstance(content, str):
        raise UserError(
            f"{where(loc, field=f'{field}.content')}: expected a string, got {json_kind(content)}"
        )
    return Message(role, content)


def check_turns(entries: list[tuple[str, object]], loc: str, whole: str) -> tuple[Message, ...]:
    """Validate (field name, raw message) pairs as one conversation; `whole` names the list."""
    messages: list[Message] = []
    for field, raw in entries:
        m = parse_message(raw, field, loc)
        if m.role == "system":
            if messages:
                raise UserError(
                    f"{where(loc, field=f'{field}.role')}: a system message is only allowed first"
                )
        else:
            # After the optional system prompt the turns alternate, user first: that is the
            # shape chat templates and assistant-only loss masks assume.
            last = messages[-1].role if messages else "system"
            expected = "assistant" if last == "user" else "user"
            if m.role != expected:
                raise UserError(
                    f"{where(loc, field=f'{field}.role')}: expected role '{expected}', got "
                    f"'{m.role}' (turns alternate user/assistant after an optional system message)"
                )
        if not m.content.strip():
            raise UserError(f"{where(loc, field=f'{field}.content')}: {_EMPTY_TURN[m.role]}")
        messages.append(m)
    if not messages:
        raise UserError(f"{where(loc, field=whole)}: no messages")
    if messages[-1].role != "assistant":
        raise UserError(
            f"{where(loc, field=whole)}: conversation ends with a {messages[-1].role} turn; "
            "it must end with an assistant turn"
        )
    return tuple(messages)


def _message_list(rec: Mapping[str, object], field: str, loc: str) -> list[tuple[str, object]]:
    value = rec[field]
    if not isinstance(value, list):
        raise UserError(
            f"{where(loc, field=field)}: expected a list of messages, got {json_kind(value)}"
        )
    return [(f"{field}[{i}]", raw) for i, raw in enumerate(value)]


def _from_chat(rec: Mapping[str, object], loc: str) -> tuple[Message, ...]:
    return check_turns(_message_list(rec, "messages", loc), loc, "messages")


def _from_alpaca(rec: Mapping[str, object], loc: str) -> tuple[Message, ...]:
    user = _joined(
        _text(rec, "instruction", loc, "empty instruction"), _text(rec, "input", loc, None)
    )
    return Message("user", user), Message("assistant", _text(rec, "output", loc, EMPTY_RESPONSE))


def _from_dolly(rec: Mapping[str, object], loc: str) -> tuple[Message, ...]:
    user = _joined(
        _text(rec, "instruction", loc, "empty instruction"), _text(rec, "context", loc, None)
    )
    return Message("user", user), Message("assistant", _text(rec, "response", loc, EMPTY_RESPONSE))


def _from_prompt_completion(rec: Mapping[str, object], loc: str) -> tuple[Message, ...]:
    prompt = rec["prompt"]
    if isinstance(prompt, str):
        return (
            Message("user", _text(rec, "prompt", loc, "empty prompt")),
            Message("assistant", _text(rec, "completion", loc, EMPTY_RESPONSE)),
        )
    if not isinstance(prompt, list):
        raise UserError(
            f"{where(loc, field='prompt')}: expected a string or a list of messages, "
            f"got {json_kind(prompt)}"
        )
    if not isinstance(rec["completion"], list):  # both halves in one style, never mixed
        raise UserError(
            f"{where(loc, field='completion')}: expected a list of messages (as 'prompt' is), "
            f"got {json_kind(rec['completion'])}"
        )
    completion = _message_list(rec, "completion", loc)
    if not completion:
        raise UserError(f"{where(loc, field='completion')}: no messages")
    return check_turns(_message_list(rec, "prompt", loc) + completion, loc, "completion")


# Checked in this order; the first format whose required fields are all present is used.
FORMATS: dict[str, Format] = {
    "chat": Format(("messages",), (), _from_chat),
    "alpaca": Format(("instruction", "output"), ("input",), _from_alpaca),
    "dolly": Format(("instruction", "context", "response"), (), _from_dolly),
    "prompt_completion": Format(("prompt", "completion"), (), _from_prompt_completion),
}
_REQUIRED = {name: fmt.required for name, fmt in FORMATS.items()}


def first_format(required: Mapping[str, Sequence[str]], rec: Mapping[str, object]) -> str | None:
    """The first format name (in table order) whose required fields `rec` holds, or None."""
    for name, fields in required.items():
        if all(field in rec for field in fields):
            return name
    return None


def match_format(
    required: Mapping[str, Sequence[str]], rec: object, loc: str, kind: str
) -> tuple[str, dict[str, object]]:
    """(format name, record) for a decoded record, or one error line naming `loc`: shared by
    every reader of record formats (`kind` names the family: instruction, preference)."""
    if not isinstance(rec, dict):
        raise UserError(f"{loc}: expected a JSON object, got {json_kind(rec)}")
    name = first_format(required, rec)
    if name is None:
        fields = ", ".join(str(k) for k in rec) or "none"
        expected = " | ".join("+".join(r) for r in required.values())
        raise UserError(
            f"{loc}: record fits no {kind} format (fields: {fields}); expected one of: {expected}"
        )
    return name, rec


def detect_format(rec: Mapping[str, object]) -> str | None:
    """The name of the first format in `FORMATS` whose required fields `rec` holds, or None."""
    return first_format(_REQUIRED, rec)


def parse_record(rec: object, path: str | Path, line: int) -> Conversation:
    """Validate one decoded record and normalise it; errors name `path:line` and the field."""
    return _parse(rec, where(path, line))


def _parse(rec: object, loc: str) -> Conversation:
    name, record = match_format(_REQUIRED, rec, loc, "instruction")
    return Conversation(FORMATS[name].convert(record, loc), source=loc)


def load_instructions(specs: Sequence[str]) -> list[Conversation]:
    """Read and validate every spec (a .jsonl/.json file or hf:NAME[:SPLIT]), in order."""
    if not specs:
        raise UserError("no instruction data given (expected .jsonl, .json or hf:NAME inputs)")
    return [conv for spec in specs for conv in read_instructions(spec)]


def hold_out_tail(items: list[T], fraction: float, what: str) -> tuple[list[T], list[T]]:
    """(train, val): the last `fraction` of `items` (at least one) held out, at least one kept."""
    n_val = max(1, round(len(items) * fraction))
    if n_val >= len(items):
        raise UserError(
            f"data: {len(items)} {what} are too few to hold out a validation share; "
            "give more, or set val_data"
        )
    return items[:-n_val], items[-n_val:]


def read_instructions(spec: str) -> list[Conversation]:
    """Read and validate one .jsonl/.json file or hf:NAME[:SPLIT] dataset."""
    name, records = read_records(spec)
    conversations = [_parse(rec, loc) for loc, rec in records]
    if not conversations:
        raise UserError(f"{name}: no records")
    return conversations


def read_records(spec: str) -> tuple[str, Iterable[tuple[str, object]]]:
    """The name of a data source (for messages) and its decoded records, each with its location
    ("file:line" or "hf:NAME:row N"); shared by every reader of JSON record files."""
    if spec.startswith("hf:"):
        return spec, _hf_records(spec[3:])
    path = Path(spec).expanduser()
    if path.is_dir():
        raise UserError(f"{path}: is a folder; give {' or '.join(SUFFIXES)} files")
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if path.suffix not in SUFFIXES:
        raise UserError(f"{path}: unsupported file type (use {', '.join(SUFFIXES)})")
    lines = read_jsonl(path) if path.suffix == ".jsonl" else read_json_array(path)
    return str(path), ((where(path, line), rec) for line, rec in lines)


def _read_text(path: Path) -> str:
    # Editors on Windows often save a byte-order mark, which json refuses; it holds no text.
    return read_utf8(path).removeprefix("\ufeff")


_WHITESPACE = re.compile(r"[ \t\n\r]*")  # JSON's whitespace, narrower than str.isspace


def read_json_array(path: Path) -> Iterator[tuple[int, object]]:
    """Yield (line where the element starts, element) for a top-level JSON array.

    json.load would lose positions, so the array is walked element by element with
    raw_decode, counting newlines up to each element's offset.
    """
    text = _read_text(path)

    def skip(pos: int) -> int:
        match = _WHITESPACE.match(text, pos)
        assert match is not None  # the pattern matches the empty string
        return match.end()

    def line_at(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    pos = skip(0)
    if pos == len(text):
        return  # an empty file: no records
    if text[pos] != "[":
        raise UserError(
            f"{where(path, line_at(pos))}: expected a top-level JSON array of records "
            "(for one record per line use .jsonl)"
        )
    pos = skip(pos + 1)
    line, counted = 1, 0  # newlines counted incrementally: offsets only grow
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            try:
                rec, end = parse_json(text, pos)
            except BadJSON as e:
                raise UserError(f"{where(path, e.line)}: invalid JSON ({e.message})") from None
            line += text.count("\n", counted, pos)
            counted = pos
            yield line, rec
            pos = skip(end)
            if text.startswith(",", pos):
                pos = skip(pos + 1)
            elif text.startswith("]", pos):
                pos += 1
                break
            else:
                raise UserError(
                    f"{where(path, line_at(pos))}: invalid JSON "
                    "(expected ',' or ']' after a record)"
                )
    if skip(pos) != len(text):
        raise UserError(f"{where(path, line_at(skip(pos)))}: unexpected text after the array")


def _hf_records(name: str) -> Iterator[tuple[str, object]]:
    repo, _, split = name.partition(":")
    if not repo:
        raise UserError(f"hf:{name}: give a dataset name, as hf:NAME[:SPLIT]")
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        raise UserError(
            f"hf:{name}: Hugging Face datasets need the extra: pip install 'lmforge[datasets]'"
        ) from None
    try:
        ds = datasets.load_dataset(repo, split=split or "train")
    except Exception as e:  # network, missing dataset, bad split: all user-facing
        reason = " ".join(str(e).split())  # keep the error on one line
        raise UserError(f"hf:{name}: cannot load dataset ({reason})") from None
    for i, row in enumerate(ds):  # rows count from 0, so "row N" is what ds[N] returns
        yield f"hf:{name}:row {i}", row
