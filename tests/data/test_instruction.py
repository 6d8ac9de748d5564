from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from lmforge.data.instruction import (
    Conversation,
    Message,
    detect_format,
    load_instructions,
    parse_record,
    read_instructions,
)
from lmforge.errors import UserError

GOOD = {"instruction": "Say hi.", "output": "Hi!"}


def user_then(answer: str, prompt: str = "Say hi.") -> tuple[Message, ...]:
    return Message("user", prompt), Message("assistant", answer)


def jsonl(tmp_path: Path, *records: object, name: str = "d.jsonl") -> Path:
    """Write records one per line; a str is written as the raw line."""
    path = tmp_path / name
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_chat_multi_turn_with_system_prompt() -> None:
    rec = {
        "id": 7,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?", "name": "ignored"},
            {"role": "assistant", "content": "6"},
        ],
    }
    assert parse_record(rec, "chat.jsonl", 4) == Conversation(
        (
            Message("system", "Be brief."),
            Message("user", "2+2?"),
            Message("assistant", "4"),
            Message("user", "And 3+3?"),
            Message("assistant", "6"),
        ),
        source="chat.jsonl:4",
    )


def test_alpaca_with_and_without_input() -> None:
    base = {"instruction": "Translate.", "output": "Bonjour"}
    assert parse_record({**base, "input": "Hello"}, "a", 1).messages == user_then(
        "Bonjour", "Translate.\n\nHello"
    )
    for no_input in ({}, {"input": ""}, {"input": "  \n"}, {"input": None}):
        assert parse_record({**base, **no_input}, "a", 1).messages == user_then(
            "Bonjour", "Translate."
        )


def test_dolly_context_appended_when_given_and_category_ignored() -> None:
    rec = {"instruction": "Who?", "context": "", "response": "Ada.", "category": "open_qa"}
    assert parse_record(rec, "d", 1).messages == user_then("Ada.", "Who?")
    rec["context"] = "Ada wrote the first program."
    assert parse_record(rec, "d", 1).messages == user_then(
        "Ada.", "Who?\n\nAda wrote the first program."
    )


def test_prompt_completion_strings_and_message_lists() -> None:
    assert parse_record({"prompt": "Q", "completion": "A"}, "p", 1).messages == user_then("A", "Q")
    rec = {
        "prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
        "completion": [{"role": "assistant", "content": "A"}],
    }
    assert parse_record(rec, "p", 1).messages == (
        Message("system", "S"),
        Message("user", "Q"),
        Message("assistant", "A"),
    )


def test_detect_format_follows_table_order() -> None:
    assert detect_format({"messages": [], "prompt": "x", "completion": "y"}) == "chat"
    assert detect_format({"instruction": "", "output": "", "context": "", "response": ""}) == (
        "alpaca"
    )
    assert detect_format({"instruction": "", "context": "", "response": ""}) == "dolly"
    assert detect_format({"prompt": "", "completion": "", "meta": 1}) == "prompt_completion"
    assert detect_format({"instruction": "", "input": ""}) is None


def test_jsonl_skips_blank_lines_and_records_sources(tmp_path: Path) -> None:
    path = jsonl(tmp_path, GOOD, "", "   ", {"prompt": "Q", "completion": "A"})
    convs = read_instructions(str(path))
    assert [c.source for c in convs] == [f"{path}:1", f"{path}:4"]
    assert convs[1].messages == user_then("A", "Q")


def test_json_array_reports_the_line_where_each_record_starts(tmp_path: Path) -> None:
    records = [GOOD, {"prompt": "Q", "completion": "A"}, {"instruction": "x", "output": " "}, GOOD]
    text = json.dumps(records, indent=2)
    path = tmp_path / "d.json"
    path.write_text(text)
    bad_line = text[: text.index('"instruction": "x"')].count("\n")  # the '{' line above it
    with pytest.raises(UserError) as e:
        read_instructions(str(path))
    assert str(e.value) == f"{path}:{bad_line}: field 'output': empty response"

    records[2] = GOOD
    path.write_text(json.dumps(records, indent=2))
    assert [c.source for c in read_instructions(str(path))] == [
        f"{path}:{n}" for n in (2, 6, 10, 14)
    ]


def test_json_array_on_one_line_and_compact(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text("\ufeff[" + json.dumps(GOOD) + "," + json.dumps(GOOD) + "]\n")
    assert [c.source for c in read_instructions(str(path))] == [f"{path}:1", f"{path}:1"]


ROLE = {"role": "user", "content": "Q"}
ANSWER = {"role": "assistant", "content": "A"}

# (record written on line 3, expected message after "d.jsonl:3: ")
RECORD_ERRORS = [
    (
        {"a": 1, "b": 2},
        "record fits no instruction format (fields: a, b); expected one of: "
        "messages | instruction+output | instruction+context+response | prompt+completion",
    ),
    ([GOOD], "expected a JSON object, got array"),
    ('{"instruction": "x",', "invalid JSON (Expecting property name enclosed in double quotes)"),
    (
        {"messages": [ROLE, ANSWER, {"role": "bot", "content": "B"}]},
        "field 'messages[2].role': unknown role 'bot' (use system, user, assistant)",
    ),
    (
        {"messages": [ROLE, ANSWER, ROLE]},
        "field 'messages': conversation ends with a user turn; it must end with an assistant turn",
    ),
    ({"messages": []}, "field 'messages': no messages"),
    ({"instruction": "x", "output": ""}, "field 'output': empty response"),
    ({"instruction": "x", "context": "", "response": " \n"}, "field 'response': empty response"),
    ({"prompt": "x", "completion": "\t"}, "field 'completion': empty response"),
    (
        {"messages": [ROLE, ANSWER, ROLE, {"role": "assistant", "content": " "}]},
        "field 'messages[3].content': empty response",
    ),
    (
        {"messages": [{"role": "user", "content": ""}, ANSWER]},
        "field 'messages[0].content': empty user turn",
    ),
    (
        {"messages": [{"role": "system", "content": ""}, ROLE, ANSWER]},
        "field 'messages[0].content': empty system prompt",
    ),
    ({"instruction": " ", "output": "y"}, "field 'instruction': empty instruction"),
    ({"prompt": "", "completion": "y"}, "field 'prompt': empty prompt"),
    (
        {"messages": [ROLE, {"role": "assistant", "content": 4}]},
        "field 'messages[1].content': expected a string, got number",
    ),
    ({"messages": "hi"}, "field 'messages': expected a list of messages, got string"),
    (
        {"messages": [ROLE, "A"]},
        "field 'messages[1]': expected an object with role and content, got string",
    ),
    ({"messages": [{"content": "Q"}, ANSWER]}, "field 'messages[0].role': missing"),
    ({"messages": [ROLE, {"role": "assistant"}]}, "field 'messages[1].content': missing"),
    (
        {"messages": [{"role": 1, "content": "Q"}]},
        "field 'messages[0].role': expected a string, got number",
    ),
    ({"instruction": "x", "output": None}, "field 'output': expected a string, got null"),
    (
        {"instruction": "x", "input": 3, "output": "y"},
        "field 'input': expected a string, got number",
    ),
    (
        {"messages": [ROLE, {"role": "system", "content": "S"}, ANSWER]},
        "field 'messages[1].role': a system message is only allowed first",
    ),
    (
        {"messages": [ROLE, ROLE, ANSWER]},
        "field 'messages[1].role': expected role 'assistant', got 'user' "
        "(turns alternate user/assistant after an optional system message)",
    ),
    (
        {"messages": [ANSWER]},
        "field 'messages[0].role': expected role 'user', got 'assistant' "
        "(turns alternate user/assistant after an optional system message)",
    ),
    (
        {"prompt": 1, "completion": "y"},
        "field 'prompt': expected a string or a list of messages, got number",
    ),
    ({"prompt": "x", "completion": [ANSWER]}, "field 'completion': expected a string, got array"),
    (
        {"prompt": [ROLE], "completion": "A"},
        "field 'completion': expected a list of messages (as 'prompt' is), got string",
    ),
    ({"prompt": [ROLE], "completion": []}, "field 'completion': no messages"),
    (
        {"prompt": [ROLE], "completion": [{"role": "assistant", "content": "A"}, ROLE]},
        "field 'completion': conversation ends with a user turn; "
        "it must end with an assistant turn",
    ),
    (
        {"prompt": [ROLE, {"role": "robot", "content": "x"}], "completion": [ANSWER]},
        "field 'prompt[1].role': unknown role 'robot' (use system, user, assistant)",
    ),
]


@pytest.mark.parametrize(("record", "message"), RECORD_ERRORS)
def test_bad_record_names_file_line_and_field(tmp_path: Path, record: object, message: str) -> None:
    path = jsonl(tmp_path, GOOD, GOOD, record, GOOD)
    with pytest.raises(UserError) as e:
        read_instructions(str(path))
    assert str(e.value) == f"{path}:3: {message}"
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("d.jsonl", b"\n  \n", "{path}: no records"),
        ("d.json", b"[\n]\n", "{path}: no records"),
        ("d.json", b"", "{path}: no records"),
        (
            "d.json",
            b'\n{"a": 1}',
            "{path}:2: expected a top-level JSON array of records "
            "(for one record per line use .jsonl)",
        ),
        (
            "d.json",
            b'[\n  {"prompt": "Q", "completion": "A"},\n]',
            "{path}:3: invalid JSON (Expecting value)",
        ),
        (
            "d.json",
            b'[{"prompt": "Q", "completion": "A"}\n\n{}]',
            "{path}:3: invalid JSON (expected ',' or ']' after a record)",
        ),
        (
            "d.json",
            b'[{"prompt": "Q", "completion": "A"}]\n]',
            "{path}:2: unexpected text after the array",
        ),
        (
            "d.json",
            b'[\n{"prompt": "Q",\n "completion": "A',
            "{path}:3: invalid JSON (Unterminated string starting at)",
        ),
        (
            "d.jsonl",
            b'{"prompt": "Q", "completion": "A"}\n{"prompt": "\xff"}\n',
            "{path}:2: not valid UTF-8 (byte offset 47)",
        ),
        ("d.csv", b"prompt,completion\n", "{path}: unsupported file type (use .jsonl, .json)"),
    ],
)
def test_bad_file_names_file_and_line(
    tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError) as e:
        read_instructions(str(path))
    assert str(e.value) == message.format(path=path)


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"nope\.jsonl: no such file$"):
        read_instructions(str(tmp_path / "nope.jsonl"))
    with pytest.raises(UserError, match=r": is a folder; give \.jsonl or \.json files$"):
        read_instructions(str(tmp_path))


def test_load_instructions_concatenates_in_order(tmp_path: Path) -> None:
    a = jsonl(tmp_path, GOOD, name="a.jsonl")
    b = tmp_path / "b.json"
    b.write_text(json.dumps([{"prompt": "Q", "completion": "A"}]))
    convs = load_instructions([str(a), str(b)])
    assert [c.source for c in convs] == [f"{a}:1", f"{b}:1"]
    with pytest.raises(UserError, match="no instruction data given"):
        load_instructions([])


def test_hf_rows_use_the_same_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str]] = []

    def load_dataset(repo: str, split: str) -> list[dict[str, object]]:
        calls.append((repo, split))
        return [GOOD, {"instruction": "x", "context": "c", "response": ""}]

    monkeypatch.setitem(sys.modules, "datasets", SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(UserError) as e:
        read_instructions("hf:org/set:test")
    assert str(e.value) == "hf:org/set:test:row 1: field 'response': empty response"
    assert calls == [("org/set", "test")]

    monkeypatch.setitem(sys.modules, "datasets", SimpleNamespace(load_dataset=lambda r, split: []))
    with pytest.raises(UserError, match=r"^hf:org/set: no records$"):
        read_instructions("hf:org/set")


def test_hf_without_datasets_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(UserError, match=r"pip install 'lmforge\[datasets\]'"):
        read_instructions("hf:org/set")


def test_hold_out_tail_keeps_at_least_one_on_each_side() -> None:
    from lmforge.data.instruction import hold_out_tail

    assert hold_out_tail(list(range(10)), 0.1, "x") == (list(range(9)), [9])
    assert hold_out_tail(list(range(3)), 0.01, "x") == ([0, 1], [2])
    with pytest.raises(UserError, match="1 example.s. are too few"):
        hold_out_tail([0], 0.5, "example(s)")
