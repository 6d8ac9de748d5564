"""The chat template: how a conversation becomes token ids and a loss mask.

One template, built from the tokenizer's reserved role tokens (ids 5..8):

    <|bos|><|system|>{system}<|end_of_turn|><|user|>{user}<|end_of_turn|>
    <|assistant|>{assistant}<|end_of_turn|> ... (no newlines; shown wrapped)

A prompt for generation ends with `<|assistant|>`; the model answers and closes its turn with
`<|end_of_turn|>`, which is where generation stops. The end-of-turn token after each assistant
reply is always inside the loss: a model never trained to emit it never stops (the most common
SFT bug in other tools).

Key choices
- Role tokens are single reserved ids, so the role of every token is known exactly and no
  whitespace convention can blur a turn boundary.
- Message text is encoded with `allow_special=False`: a user who types "<|end_of_turn|>" gets
  those characters, never a forged turn boundary. Ordinary text renders to exactly the ids that
  tokenizing the template's string gives (tested), so `JINJA_TEMPLATE` below is the same template
  for Hugging Face's `apply_chat_template`.
- The loss mask marks the tokens a model is trained to produce: each assistant reply and its
  end-of-turn, in every turn (multi-turn aware). `train_on_prompt` extends it to every token
  after `<|bos|>`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from lmforge.tokenizers.core import Tokenizer

ROLES = ("system", "user", "assistant")
END_OF_TURN = "<|end_of_turn|>"

# The same template for Hugging Face's tokenizer_config.json (written by the export stage).
JINJA_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end_of_turn|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


class Turn(Protocol):
    """Anything with a role and a content string (`data.instruction.Message`, for one)."""

    @property
    def role(self) -> str: ...

    @property
    def content(self) -> str: ...


def role_id(tok: Tokenizer, role: str) -> int:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r} (use {', '.join(ROLES)})")
    return tok.special_ids[role]


def end_of_turn_id(tok: Tokenizer) -> int:
    return tok.special_ids["end_of_turn"]


def render_chat(
    tok: Tokenizer,
    turns: Sequence[Turn],
    *,
    train_on_prompt: bool = False,
    add_generation_prompt: bool = False,
) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation and, per id, whether the model is trained to produce it.

    With `add_generation_prompt`, the ids end with `<|assistant|>`, ready for generation.
    """
    eot = end_of_turn_id(tok)
    ids, mask = [tok.bos_id], [False]
    texts = tok.encode_batch([t.content for t in turns], allow_special=False)
    for turn, text in zip(turns, texts, strict=True):
        trained = train_on_prompt or turn.role == "assistant"
        ids.append(role_id(tok, turn.role))
        mask.append(train_on_prompt)  # the role token is given, never predicted
        ids += text
        ids.append(eot)
        mask += [trained] * (len(text) + 1)
    if add_generation_prompt:
        ids.append(role_id(tok, "assistant"))
        mask.append(train_on_prompt)
    return ids, mask


def render_text(turns: Sequence[Turn], *, add_generation_prompt: bool = False) -> str:
    """The template as a string, exactly what `JINJA_TEMPLATE` produces (for display and tests)."""
    body = "".join(f"<|{t.role}|>{t.content}{END_OF_TURN}" for t in turns)
    return "<|bos|>" + body + ("<|assistant|>" if add_generation_prompt else "")
