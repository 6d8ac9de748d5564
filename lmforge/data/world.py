"""The built-in task world: a seeded synthetic universe small enough to train on a laptop CPU.

This module holds the pretraining corpus of that world: plain English documents of four kinds,
each exercising one skill a tiny model can visibly learn,

- `story`: short stories about people, objects, colours and places, consistent within a story;
- `arithmetic`: correct addition, subtraction and multiplication statements on small numbers;
- `word_fact`: reversals, capitals, word lengths and letter counts of common words;
- `sorted_list`: numbers sorted ascending and words sorted alphabetically.

Key choices:
- A fixed, small lexicon (names, objects, colours, places, towns, ~150 words) so the vocabulary
  stays tiny; the seed decides the draws and the world's fixed facts (where each person lives).
- Every fact in the text is computed by small pure functions (`ARITH_OPS`, `reverse_word`,
  `count_letter`, `make_story` returning a `Story` with its end state), so that the instruction
  tasks, checkers and gold reward added later to this module reuse exactly the same truth.
- Document kinds are an explicit table (`DOC_KINDS`) of `(world, rng, cfg) -> text` functions.
- Determinism across processes: `random.Random` seeded with strings (seeded via SHA-512, not
  Python's randomised `hash()`), and no iteration over sets.
- The validation split is drawn first; a training document whose text equals a validation
  document is redrawn, so the splits are disjoint as text and keep their exact sizes.
"""

from __future__ import annotations

import json
import operator
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.config import check, opt, to_dict
from lmforge.errors import UserError
from lmforge.io import atomic_write_text

# --------------------------------------------------------------------------------------------
# Lexicon: fixed across seeds, so a tokenizer trained on one world fits every world.


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


FEMALE_NAMES = _words("Mia Anna Lily Emma Sara Zoe Lucy Nora Ella Ruby Ava Ivy")
MALE_NAMES = _words("Tom Sam Ben Max Leo Jack Finn Noah Omar Paul Dan Eli")
OBJECTS = _words(
    "ball kite book hat cup box bike lamp key bag doll drum coat boat shoe pen chair clock"
)
COLOURS = _words("red blue green yellow black white pink orange purple brown")
PLACES = _words("park school market garden beach library farm shop river forest kitchen station")
TOWNS = _words("Oakton Riverby Hillford Stonebridge Mapleton Westbrook")
WORDS = _words("""
apple banana tiger river house table water green happy little garden window orange yellow
purple rabbit monkey pencil paper letter summer winter spring autumn bread butter cheese
cookie dinner lunch morning evening night light dark sun moon star cloud rain snow wind
storm tree flower grass stone sand ocean island mountain valley forest bird fish horse
mouse cat dog sheep goat duck chicken farmer teacher doctor baker sister brother mother
father friend family school music dance song story book clock chair bottle glass plate
spoon fork knife candle basket button pocket jacket shirt shoe boot hat door floor wall
roof kitchen bridge road train ship plane car wheel engine rocket planet silver gold copper
paint brush colour simple quick slow bright quiet loud soft hard warm cold sweet salty
strong gentle brave clever funny jump run walk swim sing read write draw climb""")


@dataclass(frozen=True)
class Person:
    name: str
    pronoun: str  # "she" / "he", used only when it cannot be ambiguous


@dataclass(frozen=True)
class World:
    """The entities of one seeded universe and its fixed facts (shared by all documents)."""

    seed: int
    people: tuple[Person, ...]
    objects: tuple[str, ...]
    colours: tuple[str, ...]
    places: tuple[str, ...]
    words: tuple[str, ...]
    homes: dict[str, str]  # person -> town: a fact that holds across the whole corpus

    @classmethod
    def from_seed(cls, seed: int) -> World:
        rng = random.Random(f"world:{seed}")
        people = tuple(Person(n, "she") for n in FEMALE_NAMES) + tuple(
            Person(n, "he") for n in MALE_NAMES
        )
        homes = {p.name: rng.choice(TOWNS) for p in people}
        return cls(seed, people, OBJECTS, COLOURS, PLACES, WORDS, homes)

    def tables(self) -> dict[str, Any]:
        """The entity tables as plain JSON data (for world.json)."""
        return {
            "people": [{"name": p.name, "pronoun": p.pronoun} for p in self.people],
            "objects": list(self.objects),
            "colours": list(self.colours),
            "places": list(self.places),
            "towns": list(TOWNS),
            "homes": dict(self.homes),
            "words": list(self.words),
        }


# --------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True, kw_only=True)
class WorldConfig:
    seed: int = opt(0, "seed of the world: same seed, identical corpus")
    n_docs: int = opt(20000, "total number of documents (train + val)")
    val_fraction: float = opt(0.05, "share of documents held out for validation")
    story_weight: float = opt(0.4, "relative frequency of short stories")
    arithmetic_weight: float = opt(0.2, "relative frequency of arithmetic statements")
    word_fact_weight: float = opt(0.2, "relative frequency of word facts (reversals, ...)")
    sorted_list_weight: float = opt(0.2, "relative frequency of sorted lists")
    max_number: int = opt(50, "largest operand in addition/subtraction and in sorted number lists")
    max_factor: int = opt(12, "largest factor in multiplication")
    max_list_len: int = opt(6, "longest list in sorted-list documents (at least 2)")

    def __post_init__(self) -> None:
        check(self.n_docs >= 2, "n_docs", f"must be >= 2 (got {self.n_docs})")
        vf = self.val_fraction
        check(0 < vf < 1, "val_fraction", f"must be strictly between 0 and 1 (got {vf})")
        weights = self.kind_weights()
        for kind, w in weights.items():
            check(w >= 0, f"{kind}_weight", f"must be >= 0 (got {w})")
        check(sum(weights.values()) > 0, "story_weight", "the *_weight fields must not all be 0")
        check(self.max_number >= 1, "max_number", f"must be >= 1 (got {self.max_number})")
        check(self.max_factor >= 1, "max_factor", f"must be >= 1 (got {self.max_factor})")
        n = self.max_list_len
        check(2 <= n <= 10, "max_list_len", f"must be between 2 and 10 (got {n})")

    def kind_weights(self) -> dict[str, float]:
        return {
            "story": self.story_weight,
            "arithmetic": self.arithmetic_weight,
            "word_fact": self.word_fact_weight,
            "sorted_list": self.sorted_list_weight,
        }

    def n_val(self) -> int:
        """Validation documents: at least one, and at least one left for training."""
        return min(self.n_docs - 1, max(1, round(self.n_docs * self.val_fraction)))


# --------------------------------------------------------------------------------------------
# Stories: a tiny simulation whose end state is returned with the text, for later QA tasks.


@dataclass(frozen=True)
class Story:
    text: str
    people: tuple[str, ...]  # everyone named in the story, in order of first mention
    holder: dict[str, str | None]  # object -> who has it at the end (None: it was left somewhere)
    colour: dict[str, str]  # object -> its colour at the end
    left_at: dict[str, str]  # object -> place where it lies, for objects nobody holds
    location: dict[str, str | None]  # person -> where they are at the end (None: never said)
    visited: dict[str, tuple[str, ...]]  # person -> places they went to, in order


STORY_TEMPLATES: dict[str, tuple[str, ...]] = {
    "home": ("{p} lived in {x}.",),
    "have": ("{p} had {a} {c} {o}.", "{p} owned {a} {c} {o}."),
    "go": ("{p} went to the {x}.", "{p} walked to the {x}.", "then {p} went to the {x}."),
    "take": ("{p} took the {o} to the {x}.",),
    "give": (
        "{p} gave the {o} to {q}.",
        "{p} gave {q} the {o}.",
        "at the {x}, {p} gave the {o} to {q}.",
    ),
    "paint": ("{p} painted the {o} {c}.", "then {p} painted the {o} {c}."),
    "leave": ("{p} left the {o} at the {x}.",),
    "find": ("{p} found the {o} at the {x}.",),
}


def make_story(world: World, rng: random.Random) -> Story:
    """A 3-6 sentence story; each event is drawn among those valid in the current state."""
    n_sentences = rng.randint(3, 6)
    cast = rng.sample(world.people, rng.randint(2, 3))
    things = rng.sample(world.objects, rng.randint(1, 2))
    holder: dict[str, str | None] = {}
    colour: dict[str, str] = {}
    left_at: dict[str, str] = {}
    left_by: dict[str, Person] = {}
    location: dict[str, str | None] = {p.name: None for p in cast}
    visited: dict[str, list[str]] = {p.name: [] for p in cast}
    sents: list[str] = []
    last: list[Person | None] = [None]  # subject of the previous sentence
    mentioned: dict[str, None] = {}  # names in order of first mention (an ordered set)

    def say(event: str, p: Person, **kw: str) -> None:
        # A pronoun only for the previous subject, and only when nobody else in the cast shares it.
        unique = sum(q.pronoun == p.pronoun for q in cast) == 1
        kw["p"] = p.pronoun if last[0] is p and unique else p.name
        last[0] = p
        mentioned.update(dict.fromkeys([p.name, kw.get("q", p.name)]))
        templates = STORY_TEMPLATES[event]
        if "x" not in kw:  # place unknown: only templates that do not mention one
            templates = tuple(t for t in templates if "{x}" not in t)
        sents.append(cap(rng.choice(templates).format(**kw)))

    def move(p: Person, place: str) -> None:
        location[p.name] = place
        visited[p.name].append(place)

    owners = [rng.choice(cast) for _ in things]
    if rng.random() < 0.3:  # the world's fixed fact: where a person lives
        say("home", owners[0], x=world.homes[owners[0].name])
    for o, p in zip(things, owners, strict=True):
        c = rng.choice(world.colours)
        holder[o], colour[o] = p.name, c
        say("have", p, a="an" if c[0] in "aeiou" else "a", c=c, o=o)

    while len(sents) < n_sentences:
        events: list[tuple[str, Person, str, Person | None]] = []
        for p in cast:
            events.append(("go", p, "", None))
            here = location[p.name]
            for o in things:
                if holder[o] == p.name:
                    events.append(("paint", p, o, None))
                    if here is not None:
                        events.append(("leave", p, o, None))
                    others = [q for q in cast if q is not p and location[q.name] == here]
                    events += [("give", p, o, q) for q in others]
                elif o in left_at and left_by[o] is not p:  # others find what one leaves
                    events.append(("find", p, o, None))
        event, p, o, q = rng.choice(events)
        here = location[p.name]
        at = {"x": here} if here is not None else {}
        if event == "go":
            # Half the time join someone elsewhere, so that giving becomes possible.
            met = [x for x in location.values() if x is not None and x != here]
            nearby = [x for x in world.places if x != here]
            place = rng.choice(met) if met and rng.random() < 0.5 else rng.choice(nearby)
            carried = [t for t in things if holder[t] == p.name]
            if carried and rng.random() < 0.5:
                say("take", p, o=rng.choice(carried), x=place)
            else:
                say("go", p, x=place)
            move(p, place)
        elif event == "give" and q is not None:
            say("give", p, o=o, q=q.name, **at)
            holder[o] = q.name
        elif event == "paint":
            c = rng.choice([x for x in world.colours if x != colour[o]])
            say("paint", p, o=o, c=c)
            colour[o] = c
        elif event == "leave" and here is not None:
            say("leave", p, o=o, x=here)
            holder[o], left_at[o], left_by[o] = None, here, p
        elif event == "find":
            place = left_at.pop(o)
            say("find", p, o=o, x=place)
            holder[o] = p.name
            move(p, place)  # finding it there means being there

    return Story(
        text=" ".join(sents),
        people=tuple(mentioned),
        holder=holder,
        colour=colour,
        left_at=left_at,
        location={k: location[k] for k in mentioned},
        visited={k: tuple(visited[k]) for k in mentioned},
    )


# --------------------------------------------------------------------------------------------
# Facts: pure functions that both the corpus and later checkers use.

ARITH_OPS: dict[str, Callable[[int, int], int]] = {
    "plus": operator.add,
    "minus": operator.sub,
    "times": operator.mul,
}


def reverse_word(word: str) -> str:
    return word[::-1]


def count_letter(word: str, letter: str) -> int:
    return word.count(letter)


_ARITH_EXTRA = {
    "plus": "the sum of {a} and {b} is {c}.",
    "minus": "if you take {b} from {a}, you get {c}.",
    "times": "{a} multiplied by {b} is {c}.",
}


def draw_arithmetic(
    rng: random.Random, max_number: int, max_factor: int
) -> tuple[int, str, int, int]:
    """(a, op, b, result) with operands up to max_number (max_factor for "times")."""
    op = rng.choice(tuple(ARITH_OPS))
    hi = max_factor if op == "times" else max_number
    a, b = rng.randint(0, hi), rng.randint(0, hi)
    if op == "minus" and a < b:
        a, b = b, a  # keep results non-negative: "minus" on small naturals only
    return a, op, b, ARITH_OPS[op](a, b)


def _arithmetic_sentence(world: World, rng: random.Random, cfg: WorldConfig) -> str:
    a, op, b, c = draw_arithmetic(rng, cfg.max_number, cfg.max_factor)
    templates = ["{a} {op} {b} equals {c}.", "{a} {op} {b} is {c}."]
    templates.append(_ARITH_EXTRA[op])
    return cap(rng.choice(templates).format(a=a, op=op, b=b, c=c))


def _word_fact_sentence(world: World, rng: random.Random, cfg: WorldConfig) -> str:
    w = rng.choice(world.words)
    fact = rng.randrange(4)
    if fact == 0:
        t = rng.choice(("the word {w} reversed is {r}.", "{w} spelled backwards is {r}."))
        return cap(t.format(w=w, r=reverse_word(w)))
    if fact == 1:
        t = rng.choice(("{w} in capitals is {u}.", "the word {w} in capital letters is {u}."))
        return cap(t.format(w=w, u=w.upper()))
    if fact == 2:
        return f"The word {w} has {len(w)} letters."
    letter = rng.choice(sorted(set(w)))  # sorted: set order varies between processes
    k = count_letter(w, letter)
    return f"There is 1 {letter} in {w}." if k == 1 else f"There are {k} {letter}'s in {w}."


_SORT_NUMBERS = (
    "sorted, the numbers {a} become {b}.",
    "the numbers {a} in increasing order are {b}.",
)
_SORT_WORDS = (
    "sorted alphabetically, the words {a} become {b}.",
    "in alphabetical order, the words {a} are {b}.",
)


def _sorted_list_sentence(world: World, rng: random.Random, cfg: WorldConfig) -> str:
    n = rng.randint(2, cfg.max_list_len)
    if rng.random() < 0.5:
        xs = [str(x) for x in sorted([rng.randint(0, cfg.max_number) for _ in range(n)])]
        templates = _SORT_NUMBERS
    else:
        xs, templates = sorted(rng.sample(world.words, n)), _SORT_WORDS
    shuffled = xs[:]
    rng.shuffle(shuffled)
    return cap(rng.choice(templates).format(a=", ".join(shuffled), b=", ".join(xs)))


def cap(s: str) -> str:
    return s[0].upper() + s[1:]


MIN_CHARS, MAX_CHARS, MAX_SENTENCES = 40, 400, 6
DocFn = Callable[[World, random.Random, WorldConfig], str]


def _sentences(make: Callable[[World, random.Random, WorldConfig], str]) -> DocFn:
    """A document of 1-4 sentences of one kind, topped up to MIN_CHARS, capped at MAX_CHARS."""

    def doc(world: World, rng: random.Random, cfg: WorldConfig) -> str:
        target, text = rng.randint(1, 4), ""
        for i in range(MAX_SENTENCES):
            if i >= target and len(text) >= MIN_CHARS:
                break
            s = make(world, rng, cfg)
            if text and len(text) + 1 + len(s) > MAX_CHARS:
                break
            text = f"{text} {s}" if text else s
        return text

    return doc


DOC_KINDS: dict[str, DocFn] = {
    "story": lambda world, rng, cfg: make_story(world, rng).text,
    "arithmetic": _sentences(_arithmetic_sentence),
    "word_fact": _sentences(_word_fact_sentence),
    "sorted_list": _sentences(_sorted_list_sentence),
}


# --------------------------------------------------------------------------------------------
# Corpus


@dataclass(frozen=True)
class WorldCorpus:
    train: list[str]
    val: list[str]  # disjoint from train as text
    kinds_train: list[str]  # kind of each train document
    kinds_val: list[str]


def generate_corpus(cfg: WorldConfig) -> WorldCorpus:
    """Draw `cfg.n_docs` documents; validation first, then training documents unlike any of them."""
    world = World.from_seed(cfg.seed)
    rng = random.Random(f"corpus:{cfg.seed}")
    names, weights = list(cfg.kind_weights()), list(cfg.kind_weights().values())
    kinds = rng.choices(names, weights, k=cfg.n_docs)
    n_val = cfg.n_val()
    val = [DOC_KINDS[k](world, rng, cfg) for k in kinds[:n_val]]
    seen = set(val)
    train: list[str] = []
    for k in kinds[n_val:]:
        for _ in range(100):  # collisions are rare; a world this small for n_docs is a user error
            text = DOC_KINDS[k](world, rng, cfg)
            if text not in seen:
                break
        else:
            raise UserError(
                f"world: cannot draw a '{k}' document unlike the validation set; "
                "raise max_number/max_factor or lower n_docs"
            )
        train.append(text)
    return WorldCorpus(train=train, val=val, kinds_train=kinds[n_val:], kinds_val=kinds[:n_val])


def write_world(cfg: WorldConfig, out_dir: Path) -> dict[str, Any]:
    """Write train.jsonl, val.jsonl and world.json into an existing `out_dir`; return counts."""
    corpus = generate_corpus(cfg)
    out_dir = Path(out_dir)
    for split, docs, kinds in (
        ("train", corpus.train, corpus.kinds_train),
        ("val", corpus.val, corpus.kinds_val),
    ):
        lines = (
            json.dumps({"text": t, "kind": k}) + "\n" for t, k in zip(docs, kinds, strict=True)
        )
        atomic_write_text(out_dir / f"{split}.jsonl", "".join(lines))
    summary = {
        "n_train": len(corpus.train),
        "n_val": len(corpus.val),
        "counts": {
            "train": dict(sorted(Counter(corpus.kinds_train).items())),
            "val": dict(sorted(Counter(corpus.kinds_val).items())),
        },
    }
    meta = {"config": to_dict(cfg), **summary, "entities": World.from_seed(cfg.seed).tables()}
    atomic_write_text(out_dir / "world.json", json.dumps(meta, indent=2) + "\n")
    return summary
