"""The built-in task world: determinism, splits, and that every stated fact is true.

Facts are checked by parsing the generated English back with regexes, independently of the
generator's own helpers, so a wrong template or a wrong computation both fail here.
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

from lmforge.config import ConfigFieldError, build, to_dict
from lmforge.data.world import (
    DOC_KINDS,
    WORDS,
    World,
    WorldConfig,
    WorldCorpus,
    generate_corpus,
    make_story,
    write_world,
)
from lmforge.errors import UserError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus() -> WorldCorpus:
    return generate_corpus(WorldConfig(n_docs=4000, seed=3))


def docs_of(corpus: WorldCorpus, kind: str) -> list[str]:
    pairs = zip(corpus.train + corpus.val, corpus.kinds_train + corpus.kinds_val, strict=True)
    return [text for text, k in pairs if k == kind]


def sentences(doc: str) -> list[str]:
    return re.split(r"(?<=\.) ", doc)


def digest(c: WorldCorpus) -> str:
    data = json.dumps([c.train, c.val, c.kinds_train, c.kinds_val])
    return hashlib.sha256(data.encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Determinism and splits


def test_same_seed_same_corpus_other_seed_different() -> None:
    a = generate_corpus(WorldConfig(n_docs=500, seed=7))
    b = generate_corpus(WorldConfig(n_docs=500, seed=7))
    c = generate_corpus(WorldConfig(n_docs=500, seed=8))
    assert a == b
    assert a.train != c.train and a.val != c.val
    assert World.from_seed(7) == World.from_seed(7)


def test_identical_across_processes_with_different_hash_seeds() -> None:
    # String hashing is randomised per process; the corpus must not depend on it.
    code = (
        "import hashlib, json; from lmforge.data.world import WorldConfig, generate_corpus; "
        "c = generate_corpus(WorldConfig(n_docs=300, seed=11)); "
        "print(hashlib.sha256(json.dumps([c.train, c.val, c.kinds_train, c.kinds_val])"
        ".encode()).hexdigest())"
    )
    expected = digest(generate_corpus(WorldConfig(n_docs=300, seed=11)))
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO)}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == expected


@pytest.mark.parametrize(
    ("n_docs", "val_fraction", "n_val"),
    [(1000, 0.1, 100), (1000, 0.05, 50), (2, 0.01, 1), (2, 0.99, 1), (11, 0.5, 6)],
)
def test_split_sizes(n_docs: int, val_fraction: float, n_val: int) -> None:
    c = generate_corpus(WorldConfig(n_docs=n_docs, val_fraction=val_fraction))
    assert len(c.val) == len(c.kinds_val) == n_val
    assert len(c.train) == len(c.kinds_train) == n_docs - n_val


def test_val_disjoint_from_train(corpus: WorldCorpus) -> None:
    assert not set(corpus.val) & set(corpus.train)


def test_val_disjoint_even_when_duplicates_are_common() -> None:
    # A tiny arithmetic-only world repeats documents often; training draws must skip val texts.
    cfg = WorldConfig(
        n_docs=3000, val_fraction=0.3, story_weight=0, word_fact_weight=0, sorted_list_weight=0,
        max_number=1, max_factor=1,
    )  # fmt: skip
    c = generate_corpus(cfg)
    assert len(set(c.val)) < len(c.val)  # duplicates really occur in this world
    assert not set(c.val) & set(c.train)
    assert (len(c.train), len(c.val)) == (2100, 900)


# --------------------------------------------------------------------------------------------
# Kinds and document shape


def test_all_kinds_appear_in_proportion(corpus: WorldCorpus) -> None:
    counts = Counter(corpus.kinds_train + corpus.kinds_val)
    assert set(counts) == set(DOC_KINDS) == set(WorldConfig().kind_weights())
    assert abs(counts["story"] / 4000 - 0.4) < 0.04
    assert all(abs(counts[k] / 4000 - 0.2) < 0.03 for k in ("arithmetic", "word_fact"))
    assert set(corpus.kinds_val) == set(DOC_KINDS)


def test_zero_weight_kind_is_absent() -> None:
    c = generate_corpus(WorldConfig(n_docs=300, story_weight=0.0, arithmetic_weight=0.0))
    assert set(c.kinds_train + c.kinds_val) == {"word_fact", "sorted_list"}


def test_documents_are_short_plain_sentences(corpus: WorldCorpus) -> None:
    for doc in corpus.train + corpus.val:
        assert 40 <= len(doc) <= 400, doc
        assert 1 <= len(sentences(doc)) <= 6, doc
        assert all(s[0].isupper() or s[0].isdigit() for s in sentences(doc)), doc
        assert doc.endswith("."), doc


# --------------------------------------------------------------------------------------------
# Facts are true

ARITH = [
    (re.compile(r"(\d+) (plus|minus|times) (\d+) (?:equals|is) (\d+)\."), None),
    (re.compile(r"The sum of (\d+) and (\d+) is (\d+)\."), "plus"),
    (re.compile(r"If you take (\d+) from (\d+), you get (\d+)\."), "take"),
    (re.compile(r"(\d+) multiplied by (\d+) is (\d+)\."), "times"),
]


def test_arithmetic_is_correct(corpus: WorldCorpus) -> None:
    cfg = WorldConfig()
    seen = Counter[str]()
    for doc in docs_of(corpus, "arithmetic"):
        for s in sentences(doc):
            matches = [(m, op) for rx, op in ARITH if (m := rx.fullmatch(s))]
            assert len(matches) == 1, s
            m, op = matches[0]
            if op is None:
                a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
            elif op == "take":
                b, a, c = map(int, m.groups())
                op = "minus"
            else:
                a, b, c = map(int, m.groups())
            assert c == {"plus": a + b, "minus": a - b, "times": a * b}[op], s
            assert c >= 0, s
            limit = cfg.max_factor if op == "times" else cfg.max_number
            assert max(a, b) <= limit, s
            seen[op] += 1
    assert set(seen) == {"plus", "minus", "times"}


WORD_FACTS = {
    "reverse": re.compile(r"(?:The word (\w+) reversed|(\w+) spelled backwards) is (\w+)\."),
    "capitals": re.compile(r"(?:The word (\w+) in capital letters|(\w+) in capitals) is (\w+)\."),
    "length": re.compile(r"The word (\w+) has (\d+) letters\."),
    "count_one": re.compile(r"There is 1 (\w) in (\w+)\."),
    "count": re.compile(r"There are (\d+) (\w)'s in (\w+)\."),
}


def test_word_facts_are_correct(corpus: WorldCorpus) -> None:
    seen = Counter[str]()
    for doc in docs_of(corpus, "word_fact"):
        for s in sentences(doc):
            hits = {k: m for k, rx in WORD_FACTS.items() if (m := rx.fullmatch(s))}
            assert len(hits) == 1, s
            (kind, m), = hits.items()  # fmt: skip
            if kind in ("reverse", "capitals"):
                word = (m[1] or m[2]).lower()
                assert m[3] == (word[::-1] if kind == "reverse" else word.upper()), s
            elif kind == "length":
                word = m[1]
                assert int(m[2]) == len(word), s
            elif kind == "count_one":
                word = m[2]
                assert word.count(m[1]) == 1, s
            else:
                word = m[3]
                assert word.count(m[2]) == int(m[1]) >= 2, s
            assert word in WORDS, s
            seen[kind] += 1
    assert set(seen) == set(WORD_FACTS)


SORTS = [
    re.compile(r"Sorted, the numbers ([\d, ]+) become ([\d, ]+)\."),
    re.compile(r"The numbers ([\d, ]+) in increasing order are ([\d, ]+)\."),
    re.compile(r"Sorted alphabetically, the words ([a-z, ]+) become ([a-z, ]+)\."),
    re.compile(r"In alphabetical order, the words ([a-z, ]+) are ([a-z, ]+)\."),
]


def test_sorted_lists_are_sorted(corpus: WorldCorpus) -> None:
    kinds = Counter[str]()
    for doc in docs_of(corpus, "sorted_list"):
        for s in sentences(doc):
            matches = [m for rx in SORTS if (m := rx.fullmatch(s))]
            assert len(matches) == 1, s
            given, result = matches[0][1].split(", "), matches[0][2].split(", ")
            numeric = given[0].isdigit()
            kinds["numbers" if numeric else "words"] += 1
            assert result == sorted(given, key=int if numeric else str), s
            assert 2 <= len(given) <= WorldConfig().max_list_len, s
    assert set(kinds) == {"numbers", "words"}


# --------------------------------------------------------------------------------------------
# Stories are consistent: replay the text as a tiny state machine and compare with the facts.

STORY = {
    "home": re.compile(r"(\w+) lived in (\w+)\."),
    "have": re.compile(r"(\w+) (?:had|owned) an? (\w+) (\w+)\."),
    "go": re.compile(r"(?:Then )?(\w+) (?:went|walked) to the (\w+)\."),
    "take": re.compile(r"(\w+) took the (\w+) to the (\w+)\."),
    "give": re.compile(r"(?:At the (\w+), )?(\w+) gave (?:the (\w+) to (\w+)|(\w+) the (\w+))\."),
    "paint": re.compile(r"(?:Then )?(\w+) painted the (\w+) (\w+)\."),
    "leave": re.compile(r"(\w+) left the (\w+) at the (\w+)\."),
    "find": re.compile(r"(\w+) found the (\w+) at the (\w+)\."),
}


def replay(text: str, world: World) -> dict[str, dict]:
    pronouns = {p.name: p.pronoun for p in world.people}
    holder: dict[str, str | None] = {}
    colour: dict[str, str] = {}
    loc: dict[str, str | None] = {}
    visited: dict[str, list[str]] = {}
    prev = ""
    for s in sentences(text):
        hits = {k: m for k, rx in STORY.items() if (m := rx.fullmatch(s))}
        assert len(hits) == 1, s
        (event, m), = hits.items()  # fmt: skip
        # The subject is the first name in the sentence, or a pronoun for the previous subject.
        who = next(g for g in m.groups() if g in pronouns or g in ("She", "He", "she", "he"))
        if who.lower() in ("she", "he"):
            assert pronouns[prev] == who.lower(), (text, s)
            assert sum(pronouns[n] == who.lower() for n in loc) == 1, (text, s)  # unambiguous
            who = prev
        prev = who
        loc.setdefault(who, None)
        visited.setdefault(who, [])
        if event == "home":
            assert world.homes[who] == m[2], s
        elif event == "have":
            holder[m[3]], colour[m[3]] = who, m[2]
        elif event in ("go", "take"):
            if event == "take":
                assert holder[m[2]] == who, (text, s)
            place = m.groups()[-1]
            assert loc[who] != place, (text, s)  # going means changing place
            loc[who] = place
            visited[who].append(place)
        elif event == "give":
            obj, to = (m[3], m[4]) if m[3] else (m[6], m[5])
            assert holder[obj] == who, (text, s)
            loc.setdefault(to, None)
            visited.setdefault(to, [])
            assert loc[to] == loc[who], (text, s)  # giving needs both in one place
            if m[1]:
                assert loc[who] == m[1], (text, s)
            holder[obj] = to
        elif event == "paint":
            assert holder[m[2]] == who and colour[m[2]] != m[3], (text, s)
            colour[m[2]] = m[3]
        elif event == "leave":
            assert holder[m[2]] == who and loc[who] == m[3], (text, s)
            holder[m[2]] = None
        elif event == "find":
            assert holder[m[2]] is None, (text, s)
            holder[m[2]], loc[who] = who, m[3]
            visited[who].append(m[3])
    return {"holder": holder, "colour": colour, "location": loc, "visited": visited}


def test_stories_are_consistent_and_match_their_facts() -> None:
    world = World.from_seed(0)
    events = Counter[str]()
    for i in range(400):
        story = make_story(world, random.Random(i))
        assert 3 <= len(sentences(story.text)) <= 6
        state = replay(story.text, world)
        assert state["holder"] == story.holder
        assert state["colour"] == story.colour
        assert state["location"] == story.location
        assert {k: tuple(v) for k, v in state["visited"].items()} == story.visited
        assert set(story.people) == set(state["location"])
        assert all(story.holder[o] is None for o in story.left_at)
        events.update(
            k for s in sentences(story.text) for k, rx in STORY.items() if rx.fullmatch(s)
        )
    assert set(events) == set(STORY)  # every event type happens


def test_homes_are_fixed_facts_of_the_world(corpus: WorldCorpus) -> None:
    homes = World.from_seed(3).homes
    found = re.findall(r"(\w+) lived in (\w+)\.", " ".join(docs_of(corpus, "story")))
    assert len(found) > 50
    assert all(homes[name] == town for name, town in found)
    assert World.from_seed(3).homes != World.from_seed(4).homes


# --------------------------------------------------------------------------------------------
# Config validation and files


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n_docs", 1),
        ("val_fraction", 0.0),
        ("val_fraction", 1.0),
        ("story_weight", -0.1),
        ("sorted_list_weight", -1.0),
        ("max_number", 0),
        ("max_factor", 0),
        ("max_list_len", 1),
        ("max_list_len", 11),
    ],
)
def test_bad_config_values_name_their_field(field: str, value: float) -> None:
    with pytest.raises(ConfigFieldError) as e:
        WorldConfig(**{field: value})  # type: ignore[arg-type]
    assert e.value.field == field
    with pytest.raises(UserError, match=f"field '{field}'"):
        build(WorldConfig, {field: value}, "world.toml")


def test_all_weights_zero_is_rejected() -> None:
    zero = {f"{k}_weight": 0.0 for k in DOC_KINDS}
    with pytest.raises(ConfigFieldError, match="must not all be 0"):
        WorldConfig(**zero)  # type: ignore[arg-type]
    with pytest.raises(UserError, match="unknown field"):
        build(WorldConfig, {"n_doc": 10})


def test_write_world_writes_jsonl_and_metadata(tmp_path: Path) -> None:
    cfg = WorldConfig(n_docs=200, val_fraction=0.1, seed=5)
    summary = write_world(cfg, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.jsonl", "val.jsonl", "world.json"]
    corpus = generate_corpus(cfg)
    for split, texts, kinds in (
        ("train", corpus.train, corpus.kinds_train),
        ("val", corpus.val, corpus.kinds_val),
    ):
        rows = [json.loads(line) for line in (tmp_path / f"{split}.jsonl").read_text().splitlines()]
        assert all(set(r) == {"text", "kind"} for r in rows)
        assert [r["text"] for r in rows] == texts and [r["kind"] for r in rows] == kinds
        assert summary["counts"][split] == dict(Counter(kinds))
    assert (summary["n_train"], summary["n_val"]) == (180, 20)
    meta = json.loads((tmp_path / "world.json").read_text())
    assert meta["config"] == to_dict(cfg)
    assert meta["counts"] == summary["counts"]
    assert meta["entities"]["homes"] == World.from_seed(5).homes
    assert set(meta["entities"]) >= {"people", "objects", "colours", "places", "words"}
    write_world(cfg, tmp_path)  # overwriting in place is fine and leaves no temp files
    assert len(list(tmp_path.iterdir())) == 3
