"""A constitution: the principles an AI judge critiques, revises and compares responses by.

Constitutional AI (Bai et al., 2022, "Constitutional AI: Harmlessness from AI Feedback")
replaces human feedback with a short list of natural-language principles. Each principle has a
critique request ("Identify ways in which the response is wrong") and a revision request
("Rewrite the response to fix them"); one comparison question ("Which response is more
correct, concise and polite?") turns the same principles into pairwise preferences. Optional
few-shot examples show the judge model the expected form of a critique and a revision.

A constitution is a TOML file (or the same keys in YAML):

    name = "world"
    comparison = "Which response answers correctly, concisely and politely?"
    [[principles]]
    name = "correct"
    critique = "Identify ways in which the response gives a wrong answer."
    revision = "Rewrite the response so that it gives the right answer."
    rule = "correct"   # optional: the world check the rule-based judge applies
    [[examples]]       # optional few-shot examples
    prompt = "..."
    response = "..."
    critique = "..."
    revision = "..."

Two ship with lmforge: `world` (the task world: answer correctly, never make up facts about the
story, be concise, be polite) and `chat` (an example for general chat). `load_constitution`
takes either name or a file path; every field is validated, and a missing field or an unknown
key is reported as one line naming the file and the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge import config as C
from lmforge.config import check, opt
from lmforge.errors import UserError

SHIPPED = Path(__file__).parent / "constitutions"

# What the rule-based judge (`judges.RuleJudge`) checks under a principle, by the world's
# checkers: the answer is right; a story answer names what the story says; nothing follows the
# answer; no rude sentence.
RULES = ("correct", "grounded", "concise", "polite")


def _required(value: str, field: str) -> None:
    check(bool(value.strip()), field, "missing or empty (a non-empty string is required)")


@dataclass(frozen=True, kw_only=True)
class Principle:
    name: str = opt("", "a short name, shown in critiques and records")
    critique: str = opt("", "the critique request: what to look for in a response")
    revision: str = opt("", "the revision request: how to rewrite the response")
    rule: str = opt("", "rule-based judge: the world check this principle stands for, from: "
                        + ", ".join(RULES) + " (empty: none)")  # fmt: skip

    def __post_init__(self) -> None:
        for f in ("name", "critique", "revision"):
            _required(getattr(self, f), f)
        check(self.rule in ("", *RULES), "rule", f"must be one of {', '.join(RULES)} or empty")


@dataclass(frozen=True, kw_only=True)
class Example:
    """A worked critique and revision, shown to an LM judge before its own task."""

    prompt: str = opt("", "the user's request")
    response: str = opt("", "a flawed response")
    critique: str = opt("", "the critique of that response")
    revision: str = opt("", "the revised response")

    def __post_init__(self) -> None:
        for f in ("prompt", "response", "critique", "revision"):
            _required(getattr(self, f), f)


@dataclass(frozen=True)
class Constitution:
    name: str
    comparison: str  # the pairwise question, answered with (A) or (B)
    principles: tuple[Principle, ...]
    examples: tuple[Example, ...] = ()
    source: str = ""  # "world", "chat" or the file it was read from

    def settings(self) -> dict[str, Any]:
        """What a preference record keeps of the constitution (its provenance)."""
        return {"name": self.name, "source": self.source,
                "principles": [p.name for p in self.principles]}  # fmt: skip


def shipped_names() -> list[str]:
    return sorted(p.stem for p in SHIPPED.glob("*.toml"))


def load_constitution(spec: str | Path) -> Constitution:
    """A shipped constitution by name (`world`, `chat`) or one read from a TOML file."""
    path = Path(spec)
    if str(spec) in shipped_names():
        path, source = SHIPPED / f"{spec}.toml", str(spec)
    elif path.suffix not in (".toml", ".yaml", ".yml"):  # YAML: the config reader has it
        raise UserError(
            f"constitution '{spec}': expected {' or '.join(shipped_names())} or a .toml file"
        )
    else:
        source = str(path)
    return parse_constitution(C.read_config_file(path), source)


def parse_constitution(raw: dict[str, Any], source: str) -> Constitution:
    """Validate a constitution's raw table; errors name `source` and the field."""
    known = {"name", "comparison", "principles", "examples"}
    for key in raw:
        if key not in known:
            raise UserError(f"{source}: field '{key}': unknown field (expected one of "
                            f"{', '.join(sorted(known))})")  # fmt: skip
    for key in ("name", "comparison"):
        value = raw.get(key)
        if not isinstance(value, str) or not value.strip():
            raise UserError(f"{source}: field '{key}': missing or empty (a non-empty string "
                            "is required)")  # fmt: skip
    principles = _tables(raw, "principles", Principle, source)
    if not principles:
        raise UserError(f"{source}: field 'principles': missing; at least one [[principles]] "
                        "table is required")  # fmt: skip
    names = [p.name for p in principles]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise UserError(f"{source}: field 'principles': the name '{dup}' is used twice")
    examples = _tables(raw, "examples", Example, source)
    return Constitution(raw["name"], raw["comparison"], tuple(principles), tuple(examples), source)


def _tables(raw: dict[str, Any], key: str, cls: type, source: str) -> list[Any]:
    items = raw.get(key, [])
    if not isinstance(items, list):
        raise UserError(f"{source}: field '{key}': expected an array of tables ([[{key}]])")
    out: list[Any] = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise UserError(f"{source}: field '{key}[{i}]': expected a table")
        # `build` names the field; the prefix says which table of the array it is in.
        try:
            out.append(C.build(cls, item, source))
        except UserError as e:
            raise UserError(str(e).replace(": field '", f": field '{key}[{i}].", 1)) from None
    return out
