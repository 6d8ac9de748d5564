"""World instruction tasks: determinism, disjoint splits, true answers, the checker and the flaws.

Answers are recomputed by parsing the prompts with regexes, independently of the generator's
helpers; story answers are compared with the `Story` end state the prompt was made from.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from lmforge.config import ConfigFieldError, build
from lmforge.data.world import World, make_story
from lmforge.data.world_tasks import (
    FLAWS,
    RAMBLE_SENTENCES,
    RUDE_SENTENCES,
    TASKS,
    TaskConfig,
    TaskExample,
    extract_answer,
    few_shot_prompt,
    is_correct,
    is_impolite,
    is_rambling,
    make_splits,
    sft_records,
)
from lmforge.errors import UserError

REPO = Path(__file__).resolve().parents[2]
SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def splits() -> dict[str, list[TaskExample]]:
    return make_splits(TaskConfig(seed=3))


def all_examples(splits: dict[str, list[TaskExample]]) -> list[TaskExample]:
    return [ex for s in SPLITS for ex in splits[s]]


def of_task(splits: dict[str, list[TaskExample]], task: str) -> list[TaskExample]:
    return [ex for ex in all_examples(splits) if ex.task == task]


def digest(splits: dict[str, list[TaskExample]]) -> str:
    data = json.dumps({s: [[e.task, e.prompt, e.answer] for e in splits[s]] for s in SPLITS})
    return hashlib.sha256(data.encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Determinism, sizes and splits


def test_same_seed_same_splits_other_seed_different() -> None:
    cfg = TaskConfig(seed=7, n_train=40, n_val=10, n_test=10)
    a, b = make_splits(cfg), make_splits(cfg)
    c = make_splits(TaskConfig(seed=8, n_train=40, n_val=10, n_test=10))
    assert a == b
    assert all(a[s] != c[s] for s in SPLITS)


def test_identical_across_processes_with_different_hash_seeds() -> None:
    # String hashing is randomised per process; the splits must not depend on it.
    code = (
        "import hashlib, json; from lmforge.data.world_tasks import TaskConfig, make_splits; "
        "s = make_splits(TaskConfig(seed=11, n_train=30, n_val=5, n_test=5)); "
        "d = {k: [[e.task, e.prompt, e.answer] for e in s[k]] for k in ('train', 'val', 'test')}; "
        "print(hashlib.sha256(json.dumps(d).encode()).hexdigest())"
    )
    expected = digest(make_splits(TaskConfig(seed=11, n_train=30, n_val=5, n_test=5)))
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO)}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == expected


def test_sizes_and_round_robin_order(splits: dict[str, list[TaskExample]]) -> None:
    cfg = TaskConfig()
    assert cfg.tasks == tuple(TASKS)
    n_tasks = len(TASKS)
    for split, n in (("train", cfg.n_train), ("val", cfg.n_val), ("test", cfg.n_test)):
        examples = splits[split]
        assert len(examples) == n * n_tasks
        assert Counter(ex.task for ex in examples) == {t: n for t in TASKS}
        assert {ex.task for ex in examples[:n_tasks]} == set(TASKS)  # a prefix covers every task


def test_splits_disjoint_and_eval_prompts_distinct(splits: dict[str, list[TaskExample]]) -> None:
    prompts = {s: [ex.prompt for ex in splits[s]] for s in SPLITS}
    assert not set(prompts["train"]) & set(prompts["val"])
    assert not set(prompts["train"]) & set(prompts["test"])
    assert not set(prompts["val"]) & set(prompts["test"])
    for s in ("val", "test"):
        assert len(set(prompts[s])) == len(prompts[s])


def test_task_subset_and_test_split_independent_of_train_size() -> None:
    small = make_splits(TaskConfig(tasks=("sort", "reverse"), n_train=5, n_val=3, n_test=4))
    assert [ex.task for ex in small["test"]] == ["sort", "reverse"] * 4
    big = make_splits(TaskConfig(tasks=("sort", "reverse"), n_train=50, n_val=3, n_test=4))
    assert big["test"] == small["test"] and big["val"] == small["val"]


def test_too_few_distinct_prompts_is_a_user_error() -> None:
    with pytest.raises(UserError, match="'reverse'.*fewer examples"):
        make_splits(TaskConfig(tasks=("reverse",), n_test=600, n_train=0, n_val=0))


def test_prompts_are_short_and_answers_canonical(splits: dict[str, list[TaskExample]]) -> None:
    for ex in all_examples(splits):
        assert len(ex.prompt.split()) <= 80, ex.prompt
        assert ex.answer and ex.answer == ex.answer.strip()
        assert ex.answer[-1] not in ".!?", ex.answer
        assert extract_answer(ex.answer) == ex.answer


# --------------------------------------------------------------------------------------------
# Answers are true


def test_arithmetic(splits: dict[str, list[TaskExample]]) -> None:
    ops = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}
    seen = set()
    for ex in of_task(splits, "arithmetic"):
        m = re.fullmatch(
            r"(What is|Compute|How much is) (\d+) (plus|minus|times) (\d+)[.?]", ex.prompt
        )
        assert m, ex.prompt
        a, op, b = int(m[2]), m[3], int(m[4])
        hi = 12 if op == "times" else 50
        assert 0 <= a <= hi and 0 <= b <= hi
        assert ex.answer == str(ops[op](a, b)) and int(ex.answer) >= 0
        seen.add(op)
    assert seen == set(ops)


def test_word_tasks(splits: dict[str, list[TaskExample]]) -> None:
    world = World.from_seed(3)
    for ex in of_task(splits, "reverse"):
        w = re.search(r"(?:word|Spell) (\w+)", ex.prompt)
        assert w and w[1] in world.words, ex.prompt
        assert ex.answer == w[1][::-1]
    for ex in of_task(splits, "capitalise"):
        w = re.search(r"(?:word|Write|is) (\w+) in capital", ex.prompt)
        assert w and w[1] in world.words, ex.prompt
        assert ex.answer == w[1].upper()


def test_count_letters(splits: dict[str, list[TaskExample]]) -> None:
    examples = of_task(splits, "count_letters")
    for ex in examples:
        m = re.search(r"(?:many|letter) (\w)(?:'s| appear)? .*?(?:in|word) (\w+)[.?]$", ex.prompt)
        assert m, ex.prompt
        assert ex.answer == str(m[2].count(m[1]))
    zeros = sum(ex.answer == "0" for ex in examples) / len(examples)
    assert 0.02 < zeros < 0.25  # a letter the word lacks: present, but a minority


def test_sort(splits: dict[str, list[TaskExample]]) -> None:
    kinds = set()
    for ex in of_task(splits, "sort"):
        m = re.fullmatch(r".*(numbers|words)[^:]*: (.*)\.", ex.prompt)
        assert m, ex.prompt
        items = m[2].split(", ")
        assert 2 <= len(items) <= 5
        key = int if m[1] == "numbers" else str
        assert ex.answer == ", ".join(sorted(items, key=key))
        kinds.add(m[1])
    assert kinds == {"numbers", "words"}


def test_story_qa_answers_match_the_story_end_state() -> None:
    world, cfg = World.from_seed(5), TaskConfig(seed=5)
    kinds: Counter[str] = Counter()
    for i in range(300):
        # The task draws its story first, so a twin rng replays the same story.
        prompt, answer = TASKS["story_qa"](world, random.Random(f"qa{i}"), cfg)
        story = make_story(world, random.Random(f"qa{i}"))
        assert f"Story: {story.text}\n" in prompt
        assert len(prompt.split()) <= 80
        question = prompt.rsplit("\nQuestion: ", 1)[1]
        if m := re.fullmatch(r"Who has the (\w+) now\?", question):
            assert answer == story.holder[m[1]] and answer is not None
            kinds["holder"] += 1
        elif m := re.fullmatch(r"What colour is the (\w+) now\?", question):
            assert answer == story.colour[m[1]]
            kinds["colour"] += 1
        elif m := re.fullmatch(r"Where is (\w+) now\?", question):
            assert answer == f"the {story.location[m[1]]}"
            kinds["location"] += 1
        else:
            raise AssertionError(question)
    assert min(kinds.values()) > 30 and len(kinds) == 3


# --------------------------------------------------------------------------------------------
# Checker


@pytest.mark.parametrize(
    ("response", "answer"),
    [
        ("19", "19"),
        ("19.", "19"),
        (" 19\nQuestion: What is 1 plus 1?", "19"),
        ("19. I hope this helps.", "19"),
        ("19! Easy.", "19"),
        ("Max? I think so.", "Max"),
        ("3, 5, 9", "3, 5, 9"),
        ("3, 5, 9. Done.", "3, 5, 9"),
        ("the park.\n", "the park"),
        ("", ""),
    ],
)
def test_extract_answer(response: str, answer: str) -> None:
    assert extract_answer(response) == answer


@pytest.mark.parametrize(
    ("task", "answer", "wrong"),
    [
        ("arithmetic", "19", ["190", "18", "1", "19.0", "nineteen", "The answer is 19."]),
        ("reverse", "elppa", ["apple", "elpap", "Elppa", "elppa elppa"]),
        ("capitalise", "APPLE", ["apple", "Apple", "APPL"]),
        ("count_letters", "3", ["2", "33", "0"]),
        ("sort", "3, 5, 9", ["3, 5, 9, 11", "9, 5, 3", "3, 5", "3,5,9"]),
        ("story_qa", "the park", ["The park", "park", "the market", "Max"]),
    ],
)
def test_is_correct_exact_match(task: str, answer: str, wrong: list[str]) -> None:
    ex = TaskExample(task, "?", answer)
    assert is_correct(ex, answer) and is_correct(ex, answer + ".")
    for w in wrong:
        assert not is_correct(ex, w), w


# --------------------------------------------------------------------------------------------
# Flaws


def test_flaws_keep_or_break_correctness_as_named(splits: dict[str, list[TaskExample]]) -> None:
    world, rng = World.from_seed(3), random.Random(0)
    for ex in splits["val"] + splits["test"]:
        assert is_correct(ex, ex.answer)
        assert not is_rambling(ex.answer) and not is_impolite(ex.answer)
        wrong = FLAWS["wrong"](ex, rng, world)
        assert not is_correct(ex, wrong) and extract_answer(wrong) == wrong
        assert not is_rambling(wrong) and not is_impolite(wrong)
        rambling = FLAWS["rambling"](ex, rng, world)
        assert is_correct(ex, rambling) and is_rambling(rambling) and not is_impolite(rambling)
        assert 2 <= sum(s in rambling for s in RAMBLE_SENTENCES) <= 3
        impolite = FLAWS["impolite"](ex, rng, world)
        assert is_correct(ex, impolite) and is_impolite(impolite) and not is_rambling(impolite)


def test_phrase_tables_do_not_overlap() -> None:
    for s in RAMBLE_SENTENCES:
        assert not is_impolite(s)
    for s in RUDE_SENTENCES:
        assert not is_rambling(s)


def test_sft_records_flaw_rates_and_contents() -> None:
    cfg = TaskConfig(seed=2, n_train=500, n_val=0, n_test=0)
    records = sft_records(cfg)
    assert len(records) == 3000
    counts = Counter(r["flaw"] for r in records)
    # Binomial(3000, 0.1): mean 300, sd ~16.4; allow 5 sd either side.
    for flaw in FLAWS:
        assert 218 <= counts[flaw] <= 382, counts
    for r in records:
        user, assistant = r["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        ex = TaskExample(r["task"], user["content"], r["answer"])
        response = assistant["content"]
        if r["flaw"] is None:
            assert response == r["answer"]
        else:
            assert (r["flaw"] != "wrong") == is_correct(ex, response)
            assert (r["flaw"] == "rambling") == is_rambling(response)
            assert (r["flaw"] == "impolite") == is_impolite(response)
    assert records == sft_records(cfg)


def test_sft_records_unflawed_and_eval_splits() -> None:
    cfg = TaskConfig(
        n_train=5, n_val=4, n_test=3, wrong_rate=1.0, rambling_rate=0.0, impolite_rate=0.0
    )
    flawed = sft_records(cfg)
    assert all(r["flaw"] == "wrong" for r in flawed)
    for split in ("train", "val", "test"):
        records = sft_records(cfg, split, flawed=False)
        assert [r["answer"] for r in records] == [ex.answer for ex in make_splits(cfg)[split]]
        assert all(
            r["flaw"] is None and r["messages"][1]["content"] == r["answer"] for r in records
        )
    with pytest.raises(UserError, match="unknown split"):
        sft_records(cfg, "dev")


def test_few_shot_prompt() -> None:
    shots = [
        TaskExample("arithmetic", "What is 1 plus 2?", "3"),
        TaskExample("reverse", "Spell cat backwards.", "tac"),
    ]
    query = TaskExample("capitalise", "Write cat in capitals.", "CAT")
    assert few_shot_prompt(shots, query) == (
        "Question: What is 1 plus 2?\nAnswer: 3\n\n"
        "Question: Spell cat backwards.\nAnswer: tac\n\n"
        "Question: Write cat in capitals.\nAnswer:"
    )
    assert is_correct(query, " CAT\n\nQuestion: Spell dog backwards.")
    assert few_shot_prompt([], query) == "Question: Write cat in capitals.\nAnswer:"


# --------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"tasks": ("reverse", "translate")}, "tasks"),
        ({"tasks": ()}, "tasks"),
        ({"tasks": ("sort", "sort")}, "tasks"),
        ({"wrong_rate": -0.1}, "wrong_rate"),
        ({"rambling_rate": 1.5}, "rambling_rate"),
        ({"impolite_rate": -1.0}, "impolite_rate"),
        ({"wrong_rate": 0.5, "rambling_rate": 0.3, "impolite_rate": 0.3}, "wrong_rate"),
        ({"n_train": -1}, "n_train"),
        ({"n_test": -1}, "n_test"),
        ({"max_number": 0}, "max_number"),
        ({"max_factor": 0}, "max_factor"),
        ({"max_list_len": 1}, "max_list_len"),
    ],
)
def test_bad_config_values_name_their_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigFieldError) as e:
        TaskConfig(**kwargs)  # type: ignore[arg-type]
    assert e.value.field == field


def test_config_loads_through_the_loader() -> None:
    cfg = build(TaskConfig, {"tasks": ["sort", "story_qa"], "wrong_rate": 0})
    assert cfg.tasks == ("sort", "story_qa") and cfg.wrong_rate == 0.0
    with pytest.raises(UserError, match="field 'tasks': unknown task"):
        build(TaskConfig, {"tasks": ["sort", "poetry"]})
    assert (
        TaskConfig(wrong_rate=0.7, rambling_rate=0.2, impolite_rate=0.1).flaw_rates()["wrong"]
        == 0.7
    )
