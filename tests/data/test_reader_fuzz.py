"""Fuzzing the readers: random and adversarial files end in valid data or one `UserError`.

Every reader of user files (pretraining text as .txt/.jsonl/.parquet, instruction and
preference records as .jsonl/.json, prompt files, responses for the ranking page, TOML/YAML
configs and recipes with dotted overrides) is fed bytes built from fragments that broke
readers elsewhere: invalid UTF-8, byte-order marks, CRLF, lone surrogate escapes, deep nesting,
huge numbers and lines, wrong JSON types, empty files. Each call returns data or raises a
`UserError` whose message is one line; any other exception fails the test. The CLI cases at
the end check exit code 2 and that nothing is left where the output would have gone.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmforge import config as C
from lmforge.data.corpora import DataConfig, load_corpus
from lmforge.data.instruction import read_instructions
from lmforge.data.preference import read_preferences
from lmforge.errors import UserError
from lmforge.feedback.ranking_page import load_tasks
from lmforge.feedback.sampling import file_prompts
from lmforge.pipeline.recipe import load_recipe
from lmforge.training.sft import SFTConfig
from tests.conftest import fails

FUZZ = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)

# Field names of every record format, so that random records often reach deep validation.
KEYS = [
    "text", "messages", "role", "content", "instruction", "input", "output", "context",
    "response", "prompt", "completion", "chosen", "rejected", "label", "responses", "ranking",
    "tie", "skip", "conversations", "from", "value", "id", "system", "user", "assistant",
]  # fmt: skip
STRINGS = [
    "", " ", "user", "assistant", "system", "human", "gpt", "hi", "\n\nHuman: hi",
    "\n\nAssistant: yo", "<|eos|>", "<|end_of_turn|>", "\ufeff", "\r\n", "\u2028", "x" * 5000,
]  # fmt: skip
json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 5),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(STRINGS),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.sampled_from(KEYS), inner, max_size=5),
    ),
    max_leaves=25,
)
# Raw pieces that are not valid JSON values or valid UTF-8 on their own.
# A YAML "billion laughs": seven levels of nine aliases each (9**6 leaves under `g`).
LAUGHS = "a: &a [1]\n" + "".join(
    f"{n}: &{n} [{','.join(['*' + p] * 9)}]\n" for p, n in zip("abcdef", "bcdefg", strict=True)
)
FRAGMENTS = [
    b"\xef\xbb\xbf", b"\r\n", b"\n", b"\n\n", b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00",
    b'"\\ud800"', b'{"text": "\\udc00x"}',
    b'{"prompt": "\\ud83d", "chosen": "a", "rejected": "b"}',
    b"[" * 3000, b'{"a":' * 2000, b"[" * 950 + b"]" * 950, b"a:\n" + b"  - " * 40 + b"x",
    b"9" * 5000, b"NaN", b"-Infinity", b"1e999", b"{}", b"[]", b"null", b",", b"]", b'"',
    b"a" * 20_000, b'{"text": ', b"key = 1", b"[section]", b"a:\n  -", b"\t", b"=", b"- - -",
    b"&a [*a, *a]", LAUGHS.encode(), b"!!python/object:os.system",
]  # fmt: skip


def _record_lines(values: list[Any], array: bool) -> bytes:
    dumped = [json.dumps(v) for v in values]
    text = "[" + ",\n".join(dumped) + "]" if array else "\n".join(dumped)
    return text.encode()


# One valid record of every format each reader knows; mutations of them reach deep validation.
def _msgs(*roles: str) -> list[dict[str, str]]:
    return [{"role": r, "content": f"{r} text"} for r in roles]


TEMPLATES: list[Any] = [
    {"text": "a document"},
    {"messages": _msgs("system", "user", "assistant", "user", "assistant")},
    {"instruction": "i", "input": "x", "output": "o"},
    {"instruction": "i", "context": "c", "response": "r"},
    {"prompt": "p", "completion": "c"},
    {"prompt": _msgs("user"), "completion": _msgs("assistant")},
    {"prompt": "p", "chosen": "a", "rejected": "b", "label": 0.7, "p_chosen": 0.6},
    {"prompt": _msgs("user"), "chosen": _msgs("user", "assistant"),
     "rejected": _msgs("assistant")[0]},
    {"prompt": "p", "responses": ["a", "b", "c"], "ranking": [2, 0], "tie": False, "skip": False},
    {"conversations": [{"from": "human", "value": "u"}], "chosen": {"from": "gpt", "value": "a"},
     "rejected": "b"},
    {"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi\n\nAssistant: b"},
    {"id": "p1", "messages": _msgs("user"), "responses": ["a", "b"]},
]  # fmt: skip
DELETE = object()


def _mutate(record: Any, edits: list[tuple[int, Any]]) -> Any:
    """`record` with, for each edit, the value at one of its paths replaced (or deleted)."""
    record = json.loads(json.dumps(record))
    for where_, value in edits:
        paths: list[tuple[Any, Any]] = []  # (container, key) of every value inside
        stack = [record]
        while stack:
            node = stack.pop()
            if isinstance(node, dict | list):
                for key, child in list(node.items() if isinstance(node, dict) else enumerate(node)):
                    paths.append((node, key))
                    stack.append(child)
        if not paths:
            return value if value is not DELETE else record
        node, key = paths[where_ % len(paths)]
        if value is DELETE:
            del node[key]
        else:
            node[key] = value
    return record


records = st.builds(
    _mutate,
    st.sampled_from(TEMPLATES),
    st.lists(st.tuples(st.integers(0, 50), st.one_of(json_values, st.just(DELETE))), max_size=2),
)


def files(array: bool) -> st.SearchStrategy[bytes]:
    """File contents: mutated records (most often), random JSON values, raw fragments, and
    valid records with a fragment between them. `array`: a .json array, else JSON lines."""
    lines = st.lists(records, min_size=1, max_size=3).map(lambda r: _record_lines(r, array))
    return st.one_of(
        lines,
        lines,
        st.builds(lambda a, frag, b: a + frag + b, lines, st.sampled_from(FRAGMENTS), lines),
        st.lists(json_values, max_size=4).map(lambda v: _record_lines(v, array)),
        st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.binary(max_size=12)), max_size=6).map(
            b"".join
        ),
    )


@contextmanager
def written(data: bytes, name: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_bytes(data)
        yield path


def data_or_user_error(read: Callable[[], object]) -> object:
    """What `read` returns, or None for a one-line `UserError`; anything else propagates."""
    try:
        return read()
    except UserError as e:
        message = str(e)
        assert message and "\n" not in message and "Traceback" not in message, message
        return None


def _corpus(path: Path, mode: str = "file") -> object:
    cfg = C.build(DataConfig, {"inputs": [str(path)], "txt_docs": mode})
    corpus = load_corpus(cfg)
    for doc in [*corpus.train, *corpus.val]:  # what the tokenizer will be given
        assert isinstance(doc, str)
        doc.encode("utf-8")
    return corpus


@FUZZ
@given(
    data=files(array=False),
    suffix=st.sampled_from([".txt", ".jsonl"]),
    mode=st.sampled_from(["file", "line", "paragraph"]),
)
def test_text_and_jsonl_corpora(data: bytes, suffix: str, mode: str) -> None:
    with written(data, "corpus" + suffix) as path:
        data_or_user_error(lambda: _corpus(path, mode))


parquet_columns = st.one_of(
    st.lists(st.one_of(st.none(), st.text(max_size=30)), max_size=5),
    st.lists(st.integers(-(2**63), 2**63 - 1), max_size=5),
    st.lists(st.lists(st.text(max_size=5), max_size=3), max_size=4),
    st.lists(st.binary(max_size=10), max_size=4),
)


@FUZZ
@given(
    column=parquet_columns,
    name=st.sampled_from(["text", "body"]),
    garbage=st.one_of(st.none(), st.binary(max_size=64)),
)
def test_parquet_corpora(column: list[Any], name: str, garbage: bytes | None) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "corpus.parquet"
        if garbage is None:
            pq.write_table(pa.table({name: column}), path)
        else:  # a corrupt file, or a real one with bytes appended
            path.write_bytes(garbage)
        data_or_user_error(lambda: _corpus(path))


def _check_records(records: object) -> object:
    assert isinstance(records, list) and records
    return records


@FUZZ
@given(draw=st.data(), suffix=st.sampled_from([".jsonl", ".json"]))
def test_instruction_preference_and_prompt_files(draw: st.DataObject, suffix: str) -> None:
    data = draw.draw(files(array=suffix == ".json"))
    with written(data, "records" + suffix) as path:
        for read in (read_instructions, read_preferences):
            data_or_user_error(lambda: _check_records(read(str(path))))  # noqa: B023
        if suffix == ".jsonl":
            data_or_user_error(lambda: _check_records(file_prompts(path)))
            data_or_user_error(lambda: _check_records(load_tasks(path)))


CONFIG_TEXT = [
    "[train]\nmax_steps = 3\n", "train.max_steps = 3\n", "tasks = 3\n", "[model]\n",
    "train:\n  max_steps: 3\n", "1: 2\n", "? [a, b]\n: c\n", "train: [1, 2]\n", "data = {a = 1}\n",
    "stages = [\"sft\", \"bogus\"]\n", "name = \"a/b\"\n", "[sft.optim]\nlr = \"x\"\n",
    "optim: {lr: .inf}\n", "when: 2001-01-01\n", "x = 1979-05-27T07:32:00Z\n",
]  # fmt: skip
config_files = st.one_of(
    files(array=False),
    st.lists(
        st.one_of(st.sampled_from(CONFIG_TEXT).map(str.encode), st.sampled_from(FRAGMENTS)),
        max_size=4,
    ).map(b"".join),
)
OVERRIDE_KEYS = ["train.max_steps", "optim.lr", "model", "data", "tasks", "tasks.n_train",
                 "name", "stages", "sft.train.max_steps", "a..b", "", ".", "train"]  # fmt: skip
overrides = st.lists(
    st.builds(
        lambda k, sep, v: f"{k}{sep}{v}",
        st.sampled_from(OVERRIDE_KEYS),
        st.sampled_from(["=", "", "=="]),
        st.one_of(
            st.sampled_from(["", "nan", "-1", "1e999", "9" * 5000, "true", "a,b"]),
            st.text(max_size=8),
        ),
    ),
    max_size=3,
)


@FUZZ
@given(data=config_files, suffix=st.sampled_from([".toml", ".yaml"]), extra=overrides)
def test_configs_and_recipes(data: bytes, suffix: str, extra: list[str]) -> None:
    with written(data, "config" + suffix) as path:
        data_or_user_error(lambda: C.load(SFTConfig, path, extra))
        data_or_user_error(lambda: load_recipe(path, Path("run"), extra))


READERS: dict[str, Callable[[Path], object]] = {
    "corpus.txt": _corpus,
    "corpus.jsonl": _corpus,
    "instructions.jsonl": lambda p: _check_records(read_instructions(str(p))),
    "instructions.json": lambda p: _check_records(read_instructions(str(p))),
    "preferences.jsonl": lambda p: _check_records(read_preferences(str(p))),
    "preferences.json": lambda p: _check_records(read_preferences(str(p))),
    "prompts.jsonl": lambda p: _check_records(file_prompts(p)),
    "responses.jsonl": lambda p: _check_records(load_tasks(p)),
    "config.toml": lambda p: C.load(SFTConfig, p),
    "config.yaml": lambda p: load_recipe(p, Path("run")),
}
VALID = json.dumps({"text": "t", "prompt": "p", "chosen": "a", "rejected": "b"}).encode()


@pytest.mark.parametrize("name", list(READERS))
def test_every_fragment_alone_and_inside_a_valid_file(name: str) -> None:
    """Hypothesis may not draw each adversarial fragment; each is tried here for certain."""
    for fragment in FRAGMENTS:
        for data in (fragment, VALID + b"\n" + fragment + b"\n" + VALID, fragment + VALID):
            with written(data, name) as path:
                data_or_user_error(lambda: READERS[name](path))  # noqa: B023


def test_configs_nested_too_deep_or_expanding_too_far_are_refused(tmp_path: Path) -> None:
    deep = "".join(f"{'  ' * i}b{i}:\n" for i in range(40)) + "  " * 40 + "x: 1\n"
    for text in (LAUGHS, deep):
        (tmp_path / "c.yaml").write_text(text)
        with pytest.raises(UserError, match="nested too deeply or too large"):
            C.read_config_file(tmp_path / "c.yaml")


# ---- the command line: exit code 2, one line, and nothing written


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("bad.jsonl", b'{"text": "a long enough document"}\n{"text": "\\ud800"}\n'),
        ("bad.jsonl", b"[" * 5000),
        ("bad.json", b'[{"instruction": "a", "output": 1}]'),
        ("bad.txt", b"\xef\xbb\xbfok\r\n\xff\n"),
    ],
)
def test_cli_refuses_bad_files_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, data: bytes
) -> None:
    bad = tmp_path / name
    bad.write_bytes(data)
    out = tmp_path / "out"
    if name.endswith(".txt"):
        fails(capsys, "tokenizer", "train", "--out", str(out), str(bad))
    elif name.endswith(".json"):
        fails(capsys, "sft", "--data", str(bad), "--out", str(out))
    else:
        fails(capsys, "pretrain", "--out", str(out), f"data.inputs={bad}")
        fails(capsys, "label", "--simulated", str(bad), "--out", str(out))
        fails(capsys, "dpo", "--data", str(bad), "--out", str(out), "policy=none")
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
    config = tmp_path / "recipe.toml"
    config.write_bytes(b"[sft]\ntrain = 1\n" + data[:100])
    fails(capsys, "run", str(config), "--out", str(out))
    assert not out.exists()
