"""Instruction tasks of the task world: prompts, canonical answers, a checker and flawed responses.

The pretraining corpus (`world.py`) states the world's facts as plain text; this module asks for
them. It is the data of the later stages: supervised fine-tuning learns to answer, and the reward
and RL stages score answers with the same checker. Six tasks, each an explicit table entry
(`TASKS`) of a `(world, rng, cfg) -> (prompt, answer)` function,

- `arithmetic`: "What is 12 plus 7?" -> "19";
- `reverse`: "Reverse the word apple." -> "elppa";
- `capitalise`: "Write the word apple in capital letters." -> "APPLE";
- `count_letters`: "How many a's are in banana?" -> "3";
- `sort`: "Sort these numbers: 9, 3, 5." -> "3, 5, 9" (or words, alphabetically);
- `story_qa`: a short story, then who has an object, its colour, or where someone is at the end.

Key choices:
- Truth comes from `world.py`'s pure functions (`ARITH_OPS`, `reverse_word`, `count_letter`,
  `make_story` and its `Story` end state), so the corpus, the answers and the checker agree.
- One answer format for every task: a good response is exactly the canonical answer (no trailing
  punctuation). `extract_answer` keeps the text before the first sentence break, so one rule
  checks all tasks and a correct answer followed by extra sentences still counts as correct.
- Crowd data is imperfect on purpose: `sft_records` replaces some good responses with a wrong
  answer, a rambling one or an impolite one (`FLAWS`), at configured rates. The style predicates
  (`is_rambling`, `is_impolite`) recognise the fixed phrase tables used here, so a gold reward can
  score correctness first and style second.
- Splits are drawn test first, then val, then train, each from its own string-seeded
  `random.Random` per task (adding a task leaves the others' examples unchanged). The three are
  disjoint by prompt text; test and val also hold each prompt once, while train may repeat a
  prompt (reverse/capitalise have only ~450 distinct prompts each), as the corpus may.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lmforge.config import check, opt
from lmforge.data.world import (
    World,
    cap,
    count_letter,
    draw_arithmetic,
    make_story,
    reverse_word,
)
from lmforge.errors import UserError


@dataclass(frozen=True)
class TaskExample:
    task: str  # a key of TASKS
    prompt: str
    answer: str  # canonical: what a good response says, exactly


TaskFn = Callable[[World, random.Random, "TaskConfig"], tuple[str, str]]

# --------------------------------------------------------------------------------------------
# Tasks: each draws one (prompt, answer) pair.

_ARITH_PROMPTS = ("what is {a} {op} {b}?", "compute {a} {op} {b}.", "how much is {a} {op} {b}?")


def _arithmetic(world: World, rng: random.Random, cfg: TaskConfig) -> tuple[str, str]:
    # Same operand ranges as the corpus, so the questions ask about facts seen in pretraining.
    a, op, b, c = draw_arithmetic(rng, cfg.max_number, cfg.max_factor)
    return cap(rng.choice(_ARITH_PROMPTS).format(a=a, op=op, b=b)), str(c)


_REVERSE_PROMPTS = (
    "reverse the word {w}.",
    "spell {w} backwards.",
    "write the word {w} backwards.",
)


def _reverse(world: World, rng: random.Random, cfg: TaskConfig) -> tuple[str, str]:
    w = rng.choice(world.words)
    return cap(rng.choice(_REVERSE_PROMPTS).format(w=w)), reverse_word(w)


_CAPITALISE_PROMPTS = (
    "write the word {w} in capital letters.",
    "write {w} in capitals.",
    "what is {w} in capital letters?",
)


def _capitalise(world: World, rng: random.Random, cfg: TaskConfig) -> tuple[str, str]:
    w = rng.choice(world.words)
    return cap(rng.choice(_CAPITALISE_PROMPTS).format(w=w)), w.upper()


_COUNT_PROMPTS = (
    "how many {l}'s are in {w}?",
    "how many times does the letter {l} appear in {w}?",
    "count the letter {l} in the word {w}.",
)
ABSENT_LETTER_RATE = 0.1  # share of count questions about a letter the word lacks (answer "0")


def _count_letters(world: World, rng: random.Random, cfg: TaskConfig) -> tuple[str, str]:
    w = rng.choice(world.words)
    if rng.random() < ABSENT_LETTER_RATE:
        letter = rng.choice([c for c in string.ascii_lowercase if c not in w])
    else:
        letter = rng.choice(sorted(set(w)))  # sorted: set order varies between processes
    prompt = cap(rng.choice(_COUNT_PROMPTS).format(l=letter, w=w))
    return prompt, str(count_letter(w, letter))


_SORT_PROMPTS = {
    "numbers": ("sort these numbers: {xs}.", "put these numbers in increasing order: {xs}."),
    "words": (
        "sort these words alphabetically: {xs}.",
        "put these words in alphabetical order: {xs}.",
    ),
}


def _sort(world: World, rng: random.Random, cfg: TaskConfig) -> tuple[str, str]:
    n = rng.randint(2, cfg.max_list_len)
    kind = rng.choice(("numbers", "words"))
    if kind == "numbers":
        xs = [str(x) for x in sorted(rng.randint(0, cfg.max_number) for _ in range(n))]
    else:
        xs = sorted(rng.sample(world.words, n))
    shuffled = xs[:]
    rng.shuffle(shuffled)
    prompt = cap(rng.choice(_SORT_PROMPTS[kind]).format(xs=", ".join(shuffled)))
    return prompt, ", ".join(xs)


def _story_qa(world: World, rng: random.Random, cfg: TaskConfig) -> tuple[str, str]:
    story = make_story(world, rng)
    # Only questions the end state answers: nobody holds a left object, and a person who never
    # went anywhere has no known location. Every object has a colour, so `colour` is never empty.
    questions: dict[str, list[tuple[str, str]]] = {
        "holder": [(f"Who has the {o} now?", h) for o, h in story.holder.items() if h is not None],
        "colour": [(f"What colour is the {o} now?", c) for o, c in story.colour.items()],
        "location": [
            (f"Where is {p} now?", f"the {x}") for p, x in story.location.items() if x is not None
        ],
    }
    kind = rng.choice([k for k, qs in questions.items() if qs])  # kind first: balanced kinds
    question, answer = rng.choice(questions[kind])
    return f"Read the story and answer.\nStory: {story.text}\nQuestion: {question}", answer


TASKS: dict[str, TaskFn] = {
    "arithmetic": _arithmetic,
    "reverse": _reverse,
    "capitalise": _capitalise,
    "count_letters": _count_letters,
    "sort": _sort,
    "story_qa": _story_qa,
}


# --------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True, kw_only=True)
class TaskConfig:
    seed: int = opt(0, "seed of the world and of the task draws: same seed, identical splits")
    tasks: tuple[str, ...] = opt(tuple(TASKS), "tasks to draw, from: " + ", ".join(TASKS))
    n_train: int = opt(600, "training examples per task (prompts may repeat within train)")
    n_val: int = opt(50, "validation examples per task (distinct prompts)")
    n_test: int = opt(100, "test examples per task (distinct prompts)")
    n_rl: int = opt(
        500, "RL rollout prompts per task: fresh draws, never val/test ones (may repeat train)"
    )
    wrong_rate: float = opt(0.1, "share of SFT responses with a wrong answer")
    rambling_rate: float = opt(0.1, "share of SFT responses with a correct answer, then filler")
    impolite_rate: float = opt(0.1, "share of SFT responses with a correct answer, then rudeness")
    max_number: int = opt(50, "largest operand in addition/subtraction and in sorted number lists")
    max_factor: int = opt(12, "largest factor in multiplication")
    max_list_len: int = opt(5, "longest list in sort tasks (at least 2)")

    def __post_init__(self) -> None:
        check(len(self.tasks) > 0, "tasks", "must name at least one task")
        unknown = [t for t in self.tasks if t not in TASKS]
        known = ", ".join(TASKS)
        check(not unknown, "tasks", f"unknown task(s) {', '.join(unknown)}; choose from {known}")
        check(len(set(self.tasks)) == len(self.tasks), "tasks", "must not repeat a task")
        for name in ("n_train", "n_val", "n_test", "n_rl"):
            n = getattr(self, name)
            check(n >= 0, name, f"must be >= 0 (got {n})")
        rates = self.flaw_rates()
        for flaw, r in rates.items():
            check(0 <= r <= 1, f"{flaw}_rate", f"must be between 0 and 1 (got {r})")
        total = sum(rates.values())
        check(total <= 1 + 1e-9, "wrong_rate", f"the *_rate fields must sum to <= 1 (got {total})")
        check(self.max_number >= 1, "max_number", f"must be >= 1 (got {self.max_number})")
        check(self.max_factor >= 1, "max_factor", f"must be >= 1 (got {self.max_factor})")
        n = self.max_list_len
        check(2 <= n <= 10, "max_list_len", f"must be between 2 and 10 (got {n})")

    def flaw_rates(self) -> dict[str, float]:
        """Flaw name (a key of FLAWS) -> share of SFT responses with that flaw."""
        return {
            "wrong": self.wrong_rate,
            "rambling": self.rambling_rate,
            "impolite": self.impolite_rate,
        }


# --------------------------------------------------------------------------------------------
# Checker: one rule for every task.

_ANSWER_END = re.compile(r"[.!?] |\n")  # commas are no boundary: sort answers contain ", "


def extract_answer(response: str) -> str:
    """The answer segment of a response: the text before the first ". ", "! ", "? " or newline,
    stripped, without one trailing "." ("19. I hope this helps." -> "19")."""
    head = _ANSWER_END.split(response.lstrip(), maxsplit=1)[0].strip()
    return head[:-1] if head.endswith(".") else head


def is_correct(example: TaskExample, response: str) -> bool:
    """Exact, case-sensitive match of the answer segment with the canonical answer."""
    return extract_answer(response) == example.answer


# --------------------------------------------------------------------------------------------
# Flawed responses. A good response is exactly `example.answer`.

RAMBLE_SENTENCES = (
    "I hope this helps.",
    "Let me explain my thinking in more detail.",
    "This is a question I have thought about many times.",
    "There are many ways to look at a question like this.",
    "It is always good to check the answer twice.",
    "I worked it out step by step before writing it down.",
    "Questions like this one come up quite often.",
    "Feel free to ask me another question.",
)
RUDE_SENTENCES = (
    "Obviously. Do not ask me such easy things again.",
    "Even a child knows that.",
    "That was a silly question.",
    "Stop wasting my time.",
    "Work it out yourself next time.",
    "Why would you even ask me that?",
)


def _contains_any(response: str, phrases: Sequence[str]) -> bool:
    text = " ".join(response.split()).lower()  # tolerant of case and of line breaks
    return any(p.lower() in text for p in phrases)


def is_rambling(response: str) -> bool:
    """Whether the response contains one of the world's filler sentences (`RAMBLE_SENTENCES`)."""
    return _contains_any(response, RAMBLE_SENTENCES)


def is_impolite(response: str) -> bool:
    """Whether the response contains one of the world's rude sentences (`RUDE_SENTENCES`)."""
    return _contains_any(response, RUDE_SENTENCES)


WrongFn = Callable[[TaskExample, random.Random, World], str]


def _pick_other(candidates: Sequence[str], answer: str, rng: random.Random) -> str:
    others = [c for c in candidates if c != answer]
    return rng.choice(others)


def _wrong_number(ex: TaskExample, rng: random.Random, world: World) -> str:
    # Near misses and a slipped digit ("190" for "19"), never negative: answers are naturals.
    n = int(ex.answer)
    candidates = [str(m) for m in (n - 2, n - 1, n + 1, n + 2, 10 * n) if m >= 0]
    return _pick_other(candidates, ex.answer, rng)


def _wrong_reversal(ex: TaskExample, rng: random.Random, world: World) -> str:
    word = reverse_word(ex.answer)
    other = rng.choice([w for w in world.words if w != word])
    i = rng.randrange(len(word) - 1)
    swapped = ex.answer[:i] + ex.answer[i + 1] + ex.answer[i] + ex.answer[i + 2 :]
    return _pick_other([word, reverse_word(other), swapped], ex.answer, rng)


def _wrong_capitals(ex: TaskExample, rng: random.Random, world: World) -> str:
    word = ex.answer.lower()
    other = rng.choice([w for w in world.words if w != word])
    return _pick_other([word.capitalize(), other.upper()], ex.answer, rng)


def _wrong_order(ex: TaskExample, rng: random.Random, world: World) -> str:
    xs = ex.answer.split(", ")
    i = rng.randrange(len(xs) - 1)
    swapped = xs[:i] + [xs[i + 1], xs[i]] + xs[i + 2 :]
    dropped = xs[:i] + xs[i + 1 :]  # always differs: shorter, so never an empty choice below
    candidates = [", ".join(xs[::-1]), ", ".join(swapped), ", ".join(dropped)]
    return _pick_other(candidates, ex.answer, rng)


def _wrong_story_answer(ex: TaskExample, rng: random.Random, world: World) -> str:
    # Another entity of the answer's kind, preferably one the story mentions (a real distractor).
    if ex.answer in world.colours:
        pool = list(world.colours)
    elif ex.answer.startswith("the "):
        pool = [f"the {x}" for x in world.places]
    else:
        pool = [p.name for p in world.people]
    story = ex.prompt.split("\nQuestion:")[0]
    mentioned = [x for x in pool if x != ex.answer and re.search(rf"\b{x}\b", story)]
    return rng.choice(mentioned) if mentioned else _pick_other(pool, ex.answer, rng)


_WRONG_ANSWERS: dict[str, WrongFn] = {
    "arithmetic": _wrong_number,
    "reverse": _wrong_reversal,
    "capitalise": _wrong_capitals,
    "count_letters": _wrong_number,
    "sort": _wrong_order,
    "story_qa": _wrong_story_answer,
}


def _rambling(ex: TaskExample, rng: random.Random, world: World) -> str:
    filler = rng.sample(RAMBLE_SENTENCES, rng.randint(2, 3))
    return f"{ex.answer}. " + " ".join(filler)


def _impolite(ex: TaskExample, rng: random.Random, world: World) -> str:
    return f"{ex.answer}. {rng.choice(RUDE_SENTENCES)}"


FLAWS: dict[str, WrongFn] = {
    "wrong": lambda ex, rng, world: _WRONG_ANSWERS[ex.task](ex, rng, world),
    "rambling": _rambling,
    "impolite": _impolite,
}


# --------------------------------------------------------------------------------------------
# Splits and records

SPLITS = ("test", "val", "train", "rl")  # drawing order: held-out prompts first
MAX_REDRAWS = 100


def make_splits(cfg: TaskConfig) -> dict[str, list[TaskExample]]:
    """Draw `n_test`, `n_val`, `n_train` examples per task into disjoint splits, interleaving the
    tasks round-robin so that any prefix of `len(cfg.tasks)` examples covers every task.

    A fourth split, `rl`, holds the prompts the RL stages roll out on: like the prompts of a
    real RLHF run, new draws from the task distribution rather than the SFT examples (a policy
    that memorised its SFT prompts has little to learn there); never a val or test prompt."""
    world = World.from_seed(cfg.seed)
    held_out: set[str] = set()  # prompts of test and val, each at most once
    out: dict[str, list[TaskExample]] = {}
    for split in SPLITS:
        n = {"test": cfg.n_test, "val": cfg.n_val, "train": cfg.n_train, "rl": cfg.n_rl}[split]
        per_task = []
        for name in cfg.tasks:
            rng = random.Random(f"tasks:{cfg.seed}:{split}:{name}")
            per_task.append([_draw(name, split, world, rng, cfg, held_out) for _ in range(n)])
        out[split] = [ex for round_ in zip(*per_task, strict=True) for ex in round_]
    return {split: out[split] for split in ("train", "val", "test", "rl")}


def _draw(
    name: str,
    split: str,
    world: World,
    rng: random.Random,
    cfg: TaskConfig,
    held_out: set[str],
) -> TaskExample:
    """One example whose prompt is not held out; test and val prompts join the held-out set."""
    for _ in range(MAX_REDRAWS):
        prompt, answer = TASKS[name](world, rng, cfg)
        if prompt not in held_out:
            break
    else:
        raise UserError(
            f"world tasks: cannot draw a '{name}' prompt for the {split} split unlike the "
            f"test/val prompts in {MAX_REDRAWS} tries; the task has too few distinct prompts "
            f"for n_test={cfg.n_test}, n_val={cfg.n_val}: ask for fewer examples"
        )
    if split in ("test", "val"):
        held_out.add(prompt)
    return TaskExample(name, prompt, answer)


def sft_records(cfg: TaskConfig, split: str = "train", flawed: bool = True) -> list[dict[str, Any]]:
    """Chat records of one split: the prompt as the user turn, a response as the assistant turn.

    With `flawed`, each response is replaced by a flawed one at the configured rates (crowd data);
    without it (evaluation references), every response is the canonical answer. `flaw` says which.
    """
    if split not in SPLITS:
        raise UserError(f"world tasks: unknown split '{split}'; choose from {', '.join(SPLITS)}")
    world = World.from_seed(cfg.seed)
    rng = random.Random(f"tasks:{cfg.seed}:flaws:{split}")
    rates = cfg.flaw_rates()
    kinds: list[str | None] = [None, *rates]
    weights = [max(0.0, 1 - sum(rates.values())), *rates.values()]
    records = []
    for ex in make_splits(cfg)[split]:
        flaw = rng.choices(kinds, weights)[0] if flawed else None
        response = ex.answer if flaw is None else FLAWS[flaw](ex, rng, world)
        records.append(
            {
                "messages": [
                    {"role": "user", "content": ex.prompt},
                    {"role": "assistant", "content": response},
                ],
                "task": ex.task,
                "answer": ex.answer,
                "flaw": flaw,
            }
        )
    return records


def few_shot_prompt(examples: Sequence[TaskExample], query: TaskExample) -> str:
    """A plain-text few-shot prompt for a base (non-chat) model, ending in "Answer:".

    The model's continuation starts with a space and runs on past the answer: the caller strips
    it and cuts it at the first newline before checking it (`extract_answer` does both).
    """
    shots = "".join(f"Question: {ex.prompt}\nAnswer: {ex.answer}\n\n" for ex in examples)
    return f"{shots}Question: {query.prompt}\nAnswer:"
