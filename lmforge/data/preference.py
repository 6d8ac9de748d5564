"""Reading preference data (for reward models and DPO): every format normalised to pairs.

A `Preference` is a prompt (the conversation so far, ending with a user turn), two assistant
replies to it, and `label`, the probability that `chosen` is the better one (1.0 for a hard
human choice; soft labels come from vote shares or AI feedback). The reward-model loss
(Bradley-Terry) and DPO both consume exactly this.

Records are recognised by their fields, checked in this order (the first format whose required
fields are all present wins; other fields such as ids, scores or `annotator` are ignored):

- `pair`: `{"prompt", "chosen", "rejected", "label"?}`, lmforge's canonical form (see
  `preference_record`) and TRL's explicit-prompt preference format. `prompt` is a string (one
  user turn) or a list of chat messages; each reply is a string, one assistant message, or a
  list of messages. A list may repeat the prompt before the reply, as UltraFeedback-binarized
  (Cui et al., 2023; HuggingFaceH4's release) does; that copy is dropped.
- `ranking`: `{"prompt", "responses", "ranking", "tie"?, "skip"?}`, written by lmforge's ranking
  page: response indices best first, possibly only a prefix ("best of K"). Each ranked response
  beats every response ranked after it and every unranked one (`expand_ranking`), so one record
  gives several pairs; a tie or skip gives none.
- `conversations`: `{"conversations", "chosen", "rejected"}`, the ShareGPT-style preference
  format of LLaMA-Factory and Argilla-style exports: messages as `{"role", "content"}` or
  `{"from", "value"}`, each reply one message object or a string.
- `hh`: `{"chosen", "rejected"}`, Anthropic's HH-RLHF (Bai et al., 2022): two whole transcripts
  of "\\n\\nHuman: " and "\\n\\nAssistant: " turns that share everything before the last
  Assistant turn. That shared part is the prompt; the last Assistant turns are the replies.

`{"from", "value"}` messages are accepted wherever messages are. Prompts follow the same
rules as SFT conversations (`instruction.py`): an optional system message, then alternating
user/assistant turns; here they must end with a user turn. Files are `.jsonl` or `.json`
(one array); `hf:NAME[:SPLIT]` reads a Hugging Face dataset. Everything is validated before
returning, with one-line errors naming the file, line and field (indices count from 0; in an
HH transcript, `chosen[2]` is its third turn). Text is kept verbatim.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from lmforge.data.instruction import (
    EMPTY_RESPONSE,
    Message,
    check_turns,
    first_format,
    json_kind,
    match_format,
    parse_message,
    read_records,
)
from lmforge.errors import UserError, where


@dataclass(frozen=True)
class Preference:
    prompt: tuple[Message, ...]  # [system], user, assistant, ..., user: never empty
    chosen: str  # assistant reply preferred with probability `label`
    rejected: str
    label: float = 1.0  # P(chosen is better than rejected), in [0, 1]
    source: str = ""  # "file:line" or "hf:NAME:row N", for messages about this pair later
    # Numbers a simulated annotator knows about a pair (`META_FIELDS`), kept for evaluation.
    meta: Mapping[str, float] = field(default_factory=dict, compare=False)


# Kept from `pair` records when present: the simulated annotator's probability of its choice
# and the gold rewards of both replies (see feedback/simulated.py).
META_FIELDS = ("p_chosen", "gold_chosen", "gold_rejected")


# A converter turns a record already known to hold its format's required fields into
# validated pairs (none, for a tie); `loc` is the "file:line" prefix for its errors.
Converter = Callable[[Mapping[str, object], str], list[Preference]]


class Format(NamedTuple):
    required: tuple[str, ...]  # all present: the record is in this format
    optional: tuple[str, ...]  # read when present; may be null
    convert: Converter


# ShareGPT's speaker names; "user" and "assistant" appear in some conversions too.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


def _as_chat(raw: object, field: str, loc: str) -> object:
    """A ShareGPT `{from, value}` message as `{role, content}`; anything else unchanged."""
    if not isinstance(raw, dict) or "role" in raw or "from" not in raw:
        return raw  # `parse_message` reports what is wrong with it
    speaker, value = raw["from"], raw.get("value")
    if not isinstance(speaker, str) or speaker not in SHAREGPT_ROLES:
        raise UserError(
            f"{where(loc, field=f'{field}.from')}: unknown role {speaker!r} "
            f"(use {', '.join(SHAREGPT_ROLES)})"
        )
    if not isinstance(value, str):
        raise UserError(
            f"{where(loc, field=f'{field}.value')}: expected a string, got {json_kind(value)}"
        )
    return {"role": SHAREGPT_ROLES[speaker], "content": value}


def _entries(value: object, field: str, loc: str) -> list[tuple[str, object]]:
    """(field name, `{role, content}` message) for each element of a JSON list of messages."""
    if not isinstance(value, list):
        raise UserError(
            f"{where(loc, field=field)}: expected a list of messages, got {json_kind(value)}"
        )
    return [(f"{field}[{i}]", _as_chat(raw, f"{field}[{i}]", loc)) for i, raw in enumerate(value)]


def _prompt_turns(entries: list[tuple[str, object]], loc: str, whole: str) -> tuple[Message, ...]:
    """Validate messages as a prompt: SFT's turn rules, but ending with a user turn."""
    messages = [parse_message(raw, field, loc) for field, raw in entries]
    if not messages:
        raise UserError(f"{where(loc, field=whole)}: no messages")
    if messages[-1].role != "user":
        raise UserError(
            f"{where(loc, field=whole)}: the prompt ends with role '{messages[-1].role}'; "
            "it must end with a user turn"
        )
    # `check_turns` holds the alternation and empty-turn rules but wants a final assistant turn;
    # a stand-in reply satisfies that (it follows a user turn, so it can never be the fault)
    # and keeps prompts and SFT conversations under one set of rules.
    stand_in = (whole, {"role": "assistant", "content": "stand-in reply"})
    return check_turns([*entries, stand_in], loc, whole)[:-1]


def _prompt(value: object, field: str, loc: str) -> tuple[Message, ...]:
    if isinstance(value, str):
        if not value.strip():
            raise UserError(f"{where(loc, field=field)}: empty prompt")
        return (Message("user", value),)
    if not isinstance(value, list):
        raise UserError(
            f"{where(loc, field=field)}: expected a string or a list of messages, "
            f"got {json_kind(value)}"
        )
    return _prompt_turns(_entries(value, field, loc), loc, field)


def _reply(value: object, field: str, prompt: tuple[Message, ...], loc: str) -> str:
    """An assistant reply given as a string, one message, or a list of messages."""
    if isinstance(value, str):
        if not value.strip():
            raise UserError(f"{where(loc, field=field)}: {EMPTY_RESPONSE}")
        return value
    if isinstance(value, dict):
        entries = [(field, _as_chat(value, field, loc))]
    elif isinstance(value, list):
        entries = _entries(value, field, loc)
    else:
        raise UserError(
            f"{where(loc, field=field)}: expected a string, a message or a list of messages, "
            f"got {json_kind(value)}"
        )
    messages = [parse_message(raw, name, loc) for name, raw in entries]
    # Datasets built for SFT-style trainers store each reply as the whole conversation; the
    # copy of the prompt is dropped only when it is exact, so a mismatch is reported below.
    start = len(prompt) if tuple(messages[: len(prompt)]) == prompt else 0
    if start == len(messages):
        raise UserError(f"{where(loc, field=field)}: no assistant message")
    for (name, _), m in zip(entries[start:], messages[start:], strict=True):
        if m.role != "assistant":
            raise UserError(
                f"{where(loc, field=f'{name}.role')}: expected role 'assistant', got "
                f"'{m.role}' (a reply list holds assistant turns, after an exact copy of the "
                "prompt if any)"
            )
    if not messages[-1].content.strip():
        raise UserError(f"{where(loc, field=f'{entries[-1][0]}.content')}: {EMPTY_RESPONSE}")
    return messages[-1].content  # several assistant turns: the last is the compared reply


def _label(rec: Mapping[str, object], loc: str) -> float:
    value = rec.get("label")
    if value is None:  # absent, or null from a Parquet/HF export
        return 1.0
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UserError(
            f"{where(loc, field='label')}: expected a number in [0, 1], got {json_kind(value)}"
        )
    if not 0.0 <= value <= 1.0:  # also rejects NaN, which Python's json accepts
        raise UserError(
            f"{where(loc, field='label')}: {value} is out of range; expected a probability "
            "in [0, 1]"
        )
    return float(value)


def _pair(
    prompt: tuple[Message, ...], chosen: str, rejected: str, label: float, loc: str
) -> Preference:
    # Equal replies give every loss a zero gradient while still counting as data: almost
    # always a conversion bug upstream, so it is reported rather than kept.
    if chosen == rejected:
        raise UserError(f"{where(loc, field='rejected')}: chosen and rejected are identical")
    return Preference(prompt, chosen, rejected, label, source=loc)


def _from_pair(rec: Mapping[str, object], loc: str) -> list[Preference]:
    prompt = _prompt(rec["prompt"], "prompt", loc)
    chosen = _reply(rec["chosen"], "chosen", prompt, loc)
    rejected = _reply(rec["rejected"], "rejected", prompt, loc)
    pair = _pair(prompt, chosen, rejected, _label(rec, loc), loc)
    meta = {k: float(v) for k in META_FIELDS if isinstance(v := rec.get(k), int | float)}
    return [dataclasses.replace(pair, meta=meta)] if meta else [pair]


def _from_conversations(rec: Mapping[str, object], loc: str) -> list[Preference]:
    prompt = _prompt_turns(
        _entries(rec["conversations"], "conversations", loc), loc, "conversations"
    )
    chosen = _reply(rec["chosen"], "chosen", prompt, loc)
    rejected = _reply(rec["rejected"], "rejected", prompt, loc)
    return [_pair(prompt, chosen, rejected, 1.0, loc)]


def _ranking_problem(n_responses: int, ranking: Sequence[object]) -> tuple[int, str] | None:
    """(position in `ranking`, what is wrong) for the first invalid index, or None."""
    seen: set[int] = set()
    for pos, i in enumerate(ranking):
        if isinstance(i, bool) or not isinstance(i, int):
            return pos, f"expected a response index (an integer), got {json_kind(i)}"
        if not 0 <= i < n_responses:  # a negative index would silently count from the end
            return (
                pos,
                f"index {i} is out of range ({n_responses} responses: 0 to {n_responses - 1})",
            )
        if i in seen:
            return pos, f"index {i} is ranked twice"
        seen.add(i)
    return None


def expand_ranking(n_responses: int, ranking: Sequence[int]) -> list[tuple[int, int]]:
    """(winner, loser) index pairs implied by a best-first ranking of some of the responses.

    Each ranked response beats every response ranked after it and every unranked one, so a
    full ranking of K gives K(K-1)/2 pairs and "best of K" (`[i]`) gives K-1. Pairs come
    winner by winner in rank order; losers in rank order, then unranked ones by index.
    """
    problem = _ranking_problem(n_responses, ranking)
    if problem is not None:
        raise ValueError(f"ranking[{problem[0]}]: {problem[1]}")
    ranked = set(ranking)
    unranked = [i for i in range(n_responses) if i not in ranked]
    return [
        (winner, loser)
        for pos, winner in enumerate(ranking)
        for loser in [*ranking[pos + 1 :], *unranked]
    ]


def _flag(rec: Mapping[str, object], field: str, loc: str) -> bool:
    value = rec.get(field)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise UserError(
            f"{where(loc, field=field)}: expected true or false, got {json_kind(value)}"
        )
    return value


def _from_ranking(rec: Mapping[str, object], loc: str) -> list[Preference]:
    prompt = _prompt(rec["prompt"], "prompt", loc)
    raw, ranking = rec["responses"], rec["ranking"]
    if not isinstance(raw, list) or len(raw) < 2:
        got = f"{len(raw)}" if isinstance(raw, list) else json_kind(raw)
        raise UserError(
            f"{where(loc, field='responses')}: expected at least 2 responses, got {got}"
        )
    responses = [_reply(r, f"responses[{i}]", prompt, loc) for i, r in enumerate(raw)]
    if not isinstance(ranking, list):
        raise UserError(
            f"{where(loc, field='ranking')}: expected a list of response indices, "
            f"got {json_kind(ranking)}"
        )
    if _flag(rec, "tie", loc) or _flag(rec, "skip", loc):
        if ranking:  # the ranking page clears it; one left behind means the record is mixed up
            raise UserError(
                f"{where(loc, field='ranking')}: a tie or skip carries an empty ranking, "
                f"got {ranking!r}"
            )
        return []
    if not ranking:
        raise UserError(
            f"{where(loc, field='ranking')}: empty ranking (set tie or skip for no preference)"
        )
    problem = _ranking_problem(len(responses), ranking)
    if problem is not None:
        raise UserError(f"{where(loc, field=f'ranking[{problem[0]}]')}: {problem[1]}")
    # Sampling often returns the same text twice; a pair of equal texts states no preference,
    # so it is left out here rather than rejected as a malformed pair would be.
    return [
        Preference(prompt, responses[w], responses[lo], source=loc)
        for w, lo in expand_ranking(len(responses), ranking)
        if responses[w] != responses[lo]
    ]


# "\n\nHuman: " and "\n\nAssistant: " open each HH turn. The first marker may lack its blank
# line (some copies of the data are stripped) and an empty final turn may lack its space.
_HH_MARKER = re.compile(r"(?:\A|\n\n)(Human|Assistant): ?")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def _transcript(value: object, field: str, loc: str) -> tuple[tuple[Message, ...], str]:
    """Split one HH transcript into (prompt, final assistant reply)."""
    if not isinstance(value, str):
        raise UserError(
            f"{where(loc, field=field)}: expected a transcript string "
            f'("\\n\\nHuman: ... \\n\\nAssistant: ..."), got {json_kind(value)}'
        )
    # With one capture group, split gives [text before, speaker, text, speaker, text, ...].
    head, *parts = _HH_MARKER.split(value)
    turns = list(zip(parts[::2], parts[1::2], strict=True))
    speakers = [speaker for speaker, _ in turns]
    if "Assistant" not in speakers:
        raise UserError(f"{where(loc, field=field)}: no '\\n\\nAssistant: ' turn in the transcript")
    if head.strip():
        raise UserError(f"{where(loc, field=field)}: text before the first 'Human:' turn")
    if speakers[-1] != "Assistant":
        raise UserError(
            f"{where(loc, field=field)}: the transcript ends with a Human turn; "
            "it must end with the Assistant reply being compared"
        )
    *before, (_, reply) = turns
    entries: list[tuple[str, object]] = [
        (f"{field}[{i}]", {"role": _HH_ROLES[speaker], "content": text})
        for i, (speaker, text) in enumerate(before)
    ]
    prompt = _prompt_turns(entries, loc, field)
    if not reply.strip():
        raise UserError(f"{where(loc, field=f'{field}[{len(before)}]')}: {EMPTY_RESPONSE}")
    return prompt, reply


def _from_hh(rec: Mapping[str, object], loc: str) -> list[Preference]:
    prompt, chosen = _transcript(rec["chosen"], "chosen", loc)
    other, rejected = _transcript(rec["rejected"], "rejected", loc)
    if other != prompt:
        turn = next(
            (i for i, (a, b) in enumerate(zip(prompt, other, strict=False)) if a != b),
            min(len(prompt), len(other)),
        )
        raise UserError(
            f"{where(loc, field='rejected')}: the conversation before its last Assistant turn "
            f"differs from the one in 'chosen' (from turn {turn})"
        )
    return [_pair(prompt, chosen, rejected, 1.0, loc)]


# Checked in this order; the first format whose required fields are all present is used.
# `hh` needs only fields the others also hold, so it comes last.
FORMATS: dict[str, Format] = {
    "pair": Format(("prompt", "chosen", "rejected"), ("label",), _from_pair),
    "ranking": Format(("prompt", "responses", "ranking"), ("tie", "skip"), _from_ranking),
    "conversations": Format(("conversations", "chosen", "rejected"), (), _from_conversations),
    "hh": Format(("chosen", "rejected"), (), _from_hh),
}
_REQUIRED = {name: fmt.required for name, fmt in FORMATS.items()}


def detect_format(rec: Mapping[str, object]) -> str | None:
    """The name of the first format in `FORMATS` whose required fields `rec` holds, or None."""
    return first_format(_REQUIRED, rec)


def parse_preference(rec: object, path: str | Path, line: int) -> list[Preference]:
    """Validate one decoded record and normalise it to pairs (none for a tie or skip)."""
    return _parse(rec, where(path, line))


def _parse(rec: object, loc: str) -> list[Preference]:
    name, record = match_format(_REQUIRED, rec, loc, "preference")
    return FORMATS[name].convert(record, loc)


def preference_record(p: Preference, /, **extra: object) -> dict[str, object]:
    """The canonical JSON form of `p` (a `pair` record), plus provenance fields in `extra`.

    The prompt is always written as messages, so a system prompt or earlier turns survive;
    `source` is not written: it says where a record was read from, not what it holds.
    """
    record: dict[str, object] = {
        "prompt": [{"role": m.role, "content": m.content} for m in p.prompt],
        "chosen": p.chosen,
        "rejected": p.rejected,
        "label": p.label,
    }
    clash = record.keys() & extra.keys()
    if clash:
        raise ValueError(f"extra fields would overwrite the pair: {', '.join(sorted(clash))}")
    return {**record, **extra}


def load_preferences(specs: Sequence[str]) -> list[Preference]:
    """Read and validate every spec (a .jsonl/.json file or hf:NAME[:SPLIT]), in order."""
    if not specs:
        raise UserError("no preference data given (expected .jsonl, .json or hf:NAME inputs)")
    return [p for spec in specs for p in read_preferences(spec)]


def read_preferences(spec: str) -> list[Preference]:
    """Read and validate one .jsonl/.json file or hf:NAME[:SPLIT] dataset."""
    name, records = read_records(spec)
    prefs: list[Preference] = []
    count = 0
    for loc, rec in records:
        count += 1
        prefs += _parse(rec, loc)
    if not count:
        raise UserError(f"{name}: no records")
    if not prefs:  # e.g. a labelling session where every prompt was skipped
        raise UserError(f"{name}: no preference pairs (ties, skips and equal responses give none)")
    return prefs
