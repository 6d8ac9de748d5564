from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from lmforge.data.instruction import Message
from lmforge.data.preference import (
    Preference,
    detect_format,
    expand_ranking,
    load_preferences,
    parse_preference,
    preference_record,
    read_preferences,
)
from lmforge.errors import UserError

PAIR = {"prompt": "3+4?", "chosen": "7", "rejected": "8"}
Q = (Message("user", "3+4?"),)


def jsonl(tmp_path: Path, *records: object, name: str = "p.jsonl") -> Path:
    """Write records one per line; a str is written as the raw line."""
    path = tmp_path / name
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def test_pair_with_string_prompt_and_default_or_soft_label() -> None:
    assert parse_preference(PAIR, "p.jsonl", 2) == [
        Preference(Q, "7", "8", 1.0, source="p.jsonl:2")
    ]
    assert parse_preference({**PAIR, "label": 0.25}, "p", 1)[0].label == 0.25
    assert parse_preference({**PAIR, "label": None, "id": "x"}, "p", 1)[0].label == 1.0


def test_pair_reply_lists_drop_a_repeated_prompt() -> None:
    # UltraFeedback-binarized style: string prompt, each reply the whole conversation.
    rec = {
        "prompt": "3+4?",
        "chosen": [user("3+4?"), assistant("7")],
        "rejected": [user("3+4?"), assistant("8")],
        "score_chosen": 9.0,
    }
    assert parse_preference(rec, "p", 1)[0] == Preference(Q, "7", "8", source="p:1")

    prompt = [{"role": "system", "content": "Be brief."}, user("Hi"), assistant("Hello"), user("Q")]
    rec = {
        "prompt": prompt,
        "chosen": [*prompt, assistant("draft"), assistant("A")],  # several turns: the last
        "rejected": assistant("B"),  # one message object
    }
    (p,) = parse_preference(rec, "p", 1)
    assert p.prompt == (
        Message("system", "Be brief."),
        Message("user", "Hi"),
        Message("assistant", "Hello"),
        Message("user", "Q"),
    )
    assert (p.chosen, p.rejected) == ("A", "B")
    # Without the copy of the prompt, assistant messages alone are the reply.
    rec["chosen"] = [assistant("A")]
    assert parse_preference(rec, "p", 1)[0].chosen == "A"


def test_conversations_in_sharegpt_and_chat_style() -> None:
    rec = {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello"},
            {"from": "human", "value": "3+4?"},
        ],
        "chosen": {"from": "gpt", "value": "7"},
        "rejected": "8",
    }
    (p,) = parse_preference(rec, "c.json", 5)
    assert p == Preference(
        (
            Message("system", "Be brief."),
            Message("user", "Hi"),
            Message("assistant", "Hello"),
            Message("user", "3+4?"),
        ),
        "7",
        "8",
        source="c.json:5",
    )
    chat = {"conversations": [user("3+4?")], "chosen": assistant("7"), "rejected": assistant("8")}
    assert parse_preference(chat, "c", 1)[0] == Preference(Q, "7", "8", source="c:1")


def test_hh_transcripts_split_into_turns() -> None:
    shared = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: What is 3+4?"
    rec = {"chosen": shared + "\n\nAssistant: 7", "rejected": shared + "\n\nAssistant: It is 8."}
    (p,) = parse_preference(rec, "hh.jsonl", 9)
    assert p == Preference(
        (
            Message("user", "Hi there"),
            Message("assistant", "Hello! How can I help?"),
            Message("user", "What is 3+4?"),
        ),
        "7",
        "It is 8.",
        source="hh.jsonl:9",
    )
    # A stripped copy without the leading blank line reads the same; replies keep newlines.
    one = {"chosen": "Human: Q\n\nAssistant: A\nB", "rejected": "Human: Q\n\nAssistant: C"}
    assert parse_preference(one, "hh", 1)[0] == Preference(
        (Message("user", "Q"),), "A\nB", "C", source="hh:1"
    )


def test_ranking_expands_into_pairs() -> None:
    responses = ["a", "b", "c", "d"]
    best_of_4 = {"prompt": [user("Q")], "responses": responses, "ranking": [2]}
    prefs = parse_preference(best_of_4, "r", 1)
    assert [(p.chosen, p.rejected) for p in prefs] == [("c", "a"), ("c", "b"), ("c", "d")]
    assert all(p.prompt == (Message("user", "Q"),) and p.label == 1.0 for p in prefs)

    full = {"prompt": "Q", "responses": ["a", "b", "c"], "ranking": [2, 0, 1], "tie": False}
    assert [(p.chosen, p.rejected) for p in parse_preference(full, "r", 1)] == [
        ("c", "a"),
        ("c", "b"),
        ("a", "b"),
    ]
    for no_preference in ({"tie": True}, {"skip": True}):
        assert parse_preference({**full, "ranking": [], **no_preference}, "r", 1) == []


def test_ranking_leaves_out_pairs_of_equal_responses() -> None:
    rec = {"prompt": "Q", "responses": ["7", "7", "8"], "ranking": [0]}
    assert [(p.chosen, p.rejected) for p in parse_preference(rec, "r", 1)] == [("7", "8")]


def test_expand_ranking() -> None:
    assert expand_ranking(4, [2]) == [(2, 0), (2, 1), (2, 3)]
    assert expand_ranking(3, [2, 0, 1]) == [(2, 0), (2, 1), (0, 1)]
    # Ranking all but one is a full ranking: the last is implied.
    assert expand_ranking(3, [2, 0]) == expand_ranking(3, [2, 0, 1])
    assert len(expand_ranking(5, [4, 3, 2, 1, 0])) == 10
    assert expand_ranking(3, []) == []
    for bad in ([3], [-1], [0, 0]):
        with pytest.raises(ValueError, match=r"^ranking\[\d\]: "):
            expand_ranking(3, bad)


def test_detect_format_follows_table_order() -> None:
    assert detect_format({"prompt": "", "chosen": "", "rejected": ""}) == "pair"
    assert detect_format({"prompt": "", "responses": [], "ranking": []}) == "ranking"
    assert detect_format({"conversations": [], "chosen": "", "rejected": ""}) == "conversations"
    assert detect_format({"chosen": "", "rejected": "", "meta": 1}) == "hh"
    assert detect_format({"prompt": "", "chosen": ""}) is None


ROUND_TRIP = [
    Preference(Q, "7", "8"),
    Preference(
        (
            Message("system", "S"),
            Message("user", "Hi"),
            Message("assistant", "Yo"),
            Message("user", "Q"),
        ),
        "A\n",
        " B",
        label=0.5,
    ),
    Preference(Q, "8", "7", label=0.0),
]


def test_preference_record_round_trips(tmp_path: Path) -> None:
    records = [preference_record(p, id=f"world:train:{i}") for i, p in enumerate(ROUND_TRIP)]
    assert records[0] == {
        "prompt": [{"role": "user", "content": "3+4?"}],
        "chosen": "7",
        "rejected": "8",
        "label": 1.0,
        "id": "world:train:0",
    }
    path = jsonl(tmp_path, *records)
    got = read_preferences(str(path))
    assert got == [
        dataclasses.replace(p, source=f"{path}:{i + 1}") for i, p in enumerate(ROUND_TRIP)
    ]
    with pytest.raises(ValueError, match="would overwrite the pair: chosen"):
        preference_record(ROUND_TRIP[0], chosen="x")


def test_json_array_reports_the_line_where_each_record_starts(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps([PAIR, {**PAIR, "label": 2}], indent=2))
    with pytest.raises(UserError) as e:
        read_preferences(str(path))
    assert str(e.value) == (
        f"{path}:7: field 'label': 2 is out of range; expected a probability in [0, 1]"
    )
    path.write_text(json.dumps([PAIR, PAIR], indent=2))
    assert [p.source for p in read_preferences(str(path))] == [f"{path}:2", f"{path}:7"]


def test_load_preferences_concatenates_in_order(tmp_path: Path) -> None:
    a = jsonl(tmp_path, PAIR, name="a.jsonl")
    b = tmp_path / "b.json"
    b.write_text(json.dumps([{"prompt": "Q", "responses": ["x", "y", "z"], "ranking": [1]}]))
    assert [p.source for p in load_preferences([str(a), str(b)])] == [f"{a}:1", f"{b}:1", f"{b}:1"]
    with pytest.raises(UserError, match="^no preference data given"):
        load_preferences([])


def test_hf_rows_use_the_same_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [{"chosen": "\n\nHuman: Q\n\nAssistant: A", "rejected": "\n\nHuman: Q\n\nAssistant: B"}]

    def load_dataset(repo: str, split: str) -> list[dict[str, str]]:
        assert (repo, split) == ("Anthropic/hh-rlhf", "test")
        return rows + [{"chosen": "\n\nHuman: Q", "rejected": "x"}]

    monkeypatch.setitem(sys.modules, "datasets", SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(UserError) as e:
        read_preferences("hf:Anthropic/hh-rlhf:test")
    assert str(e.value) == (
        "hf:Anthropic/hh-rlhf:test:row 1: field 'chosen': "
        "no '\\n\\nAssistant: ' turn in the transcript"
    )
    monkeypatch.setitem(
        sys.modules, "datasets", SimpleNamespace(load_dataset=lambda r, split: rows)
    )
    assert read_preferences("hf:org/set")[0].source == "hf:org/set:row 0"
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(UserError, match=r"^hf:org/set: Hugging Face datasets need the extra"):
        read_preferences("hf:org/set")


HH_Q = "\n\nHuman: Q\n\nAssistant: "
RANKED = {"prompt": "Q", "responses": ["a", "b", "c"]}

# (record written on line 3, expected message after "p.jsonl:3: ")
RECORD_ERRORS = [
    (
        {"prompt": "Q", "chosen": "A"},
        "record fits no preference format (fields: prompt, chosen); expected one of: "
        "prompt+chosen+rejected | prompt+responses+ranking | conversations+chosen+rejected | "
        "chosen+rejected",
    ),
    ('{"prompt": "Q", "chosen": ', "invalid JSON (Expecting value)"),
    ([PAIR], "expected a JSON object, got array"),
    (
        {**PAIR, "prompt": [{"role": "bot", "content": "Q"}]},
        "field 'prompt[0].role': unknown role 'bot' (use system, user, assistant)",
    ),
    (
        {"conversations": [{"from": "bot", "value": "Q"}], "chosen": "A", "rejected": "B"},
        "field 'conversations[0].from': unknown role 'bot' "
        "(use human, user, gpt, assistant, system)",
    ),
    (
        {"conversations": [{"from": ["human"], "value": "Q"}], "chosen": "A", "rejected": "B"},
        "field 'conversations[0].from': unknown role ['human'] "
        "(use human, user, gpt, assistant, system)",
    ),
    (
        {"chosen": "Just text", "rejected": "B"},
        "field 'chosen': no '\\n\\nAssistant: ' turn in the transcript",
    ),
    ({**PAIR, "chosen": " \n"}, "field 'chosen': empty response"),
    ({**PAIR, "rejected": assistant("")}, "field 'rejected.content': empty response"),
    ({**PAIR, "rejected": []}, "field 'rejected': no assistant message"),
    ({**PAIR, "rejected": "7"}, "field 'rejected': chosen and rejected are identical"),
    (
        {**PAIR, "chosen": [user("Other question"), assistant("7")]},
        "field 'chosen[0].role': expected role 'assistant', got 'user' (a reply list holds "
        "assistant turns, after an exact copy of the prompt if any)",
    ),
    (
        {**PAIR, "prompt": [user("Q"), assistant("A")]},
        "field 'prompt': the prompt ends with role 'assistant'; it must end with a user turn",
    ),
    (
        {"conversations": [{"from": "system", "value": "S"}], "chosen": "A", "rejected": "B"},
        "field 'conversations': the prompt ends with role 'system'; it must end with a user turn",
    ),
    (
        {**PAIR, "prompt": [user("Q"), user("Q again")]},
        "field 'prompt[1].role': expected role 'assistant', got 'user' "
        "(turns alternate user/assistant after an optional system message)",
    ),
    ({**PAIR, "prompt": []}, "field 'prompt': no messages"),
    ({**PAIR, "prompt": ""}, "field 'prompt': empty prompt"),
    (
        {**RANKED, "ranking": [3]},
        "field 'ranking[0]': index 3 is out of range (3 responses: 0 to 2)",
    ),
    (
        {**RANKED, "ranking": [0, -1]},
        "field 'ranking[1]': index -1 is out of range (3 responses: 0 to 2)",
    ),
    ({**RANKED, "ranking": [1, 0, 1]}, "field 'ranking[2]': index 1 is ranked twice"),
    (
        {**RANKED, "ranking": ["1"]},
        "field 'ranking[0]': expected a response index (an integer), got string",
    ),
    (
        {**RANKED, "ranking": []},
        "field 'ranking': empty ranking (set tie or skip for no preference)",
    ),
    (
        {**RANKED, "ranking": [0], "tie": True},
        "field 'ranking': a tie or skip carries an empty ranking, got [0]",
    ),
    (
        {**RANKED, "responses": ["a"], "ranking": [0]},
        "field 'responses': expected at least 2 responses, got 1",
    ),
    ({**RANKED, "responses": ["a", ""], "ranking": [0]}, "field 'responses[1]': empty response"),
    (
        {**PAIR, "label": 1.5},
        "field 'label': 1.5 is out of range; expected a probability in [0, 1]",
    ),
    (
        {**PAIR, "label": -0.1},
        "field 'label': -0.1 is out of range; expected a probability in [0, 1]",
    ),
    ({**PAIR, "label": True}, "field 'label': expected a number in [0, 1], got boolean"),
    (
        {"chosen": "\n\nHuman: Q A", "rejected": HH_Q + "B"},
        "field 'chosen': no '\\n\\nAssistant: ' turn in the transcript",
    ),
    (
        {"chosen": HH_Q + "A", "rejected": HH_Q + "B\n\nHuman: more?"},
        "field 'rejected': the transcript ends with a Human turn; "
        "it must end with the Assistant reply being compared",
    ),
    (
        {"chosen": HH_Q + "A", "rejected": "\n\nHuman: Other\n\nAssistant: B"},
        "field 'rejected': the conversation before its last Assistant turn differs from the "
        "one in 'chosen' (from turn 0)",
    ),
    (
        {"chosen": HH_Q + "A", "rejected": HH_Q + "A"},
        "field 'rejected': chosen and rejected are identical",
    ),
    ({"chosen": HH_Q, "rejected": HH_Q + "B"}, "field 'chosen[1]': empty response"),
    (
        {"chosen": "Intro\n\nHuman: Q\n\nAssistant: A", "rejected": HH_Q + "B"},
        "field 'chosen': text before the first 'Human:' turn",
    ),
    (
        {"chosen": [user("Q"), assistant("A")], "rejected": HH_Q + "B"},
        "field 'chosen': expected a transcript string "
        '("\\n\\nHuman: ... \\n\\nAssistant: ..."), got array',
    ),
]


@pytest.mark.parametrize(("record", "message"), RECORD_ERRORS)
def test_bad_record_names_file_line_and_field(tmp_path: Path, record: object, message: str) -> None:
    path = jsonl(tmp_path, PAIR, PAIR, record, PAIR)
    with pytest.raises(UserError) as e:
        read_preferences(str(path))
    assert str(e.value) == f"{path}:3: {message}"
    assert "\n" not in str(e.value)


def test_files_without_pairs(tmp_path: Path) -> None:
    for name, text in (("p.jsonl", "\n \n"), ("p.json", "[\n]\n")):
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(UserError) as e:
            read_preferences(str(path))
        assert str(e.value) == f"{path}: no records"
    path = jsonl(tmp_path, {**RANKED, "ranking": [], "skip": True})
    with pytest.raises(UserError) as e:
        read_preferences(str(path))
    assert str(e.value) == (
        f"{path}: no preference pairs (ties, skips and equal responses give none)"
    )


def test_missing_file_folder_and_file_type(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"nope\.jsonl: no such file$"):
        read_preferences(str(tmp_path / "nope.jsonl"))
    with pytest.raises(UserError, match=r": is a folder; give \.jsonl or \.json files$"):
        read_preferences(str(tmp_path))
    (tmp_path / "p.csv").write_text("prompt,chosen,rejected\n")
    with pytest.raises(UserError, match=r"p\.csv: unsupported file type \(use \.jsonl, \.json\)$"):
        read_preferences(str(tmp_path / "p.csv"))
