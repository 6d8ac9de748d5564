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

A tokenizer imported from Hugging Face brings its own Jinja template instead (`ImportedTokenizer.
chat_template`), rendered in a sandbox as transformers renders it. To know which tokens are the
reply, the conversation is rendered once per turn with each message's content replaced by a
placeholder: what a turn adds to the text is that turn, the part `add_generation_prompt` adds
before an assistant turn is its (untrained) header, and the placeholders mark where content goes.
Template text is encoded with its special tokens, content as plain text (no forged turns), piece
by piece, which is also how a prompt and a generated reply meet at inference.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any, NoReturn, Protocol

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmforge.errors import UserError
from lmforge.tokenizers.core import ImportedTokenizer, Tokenizer

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
    if tok.chat_template is not None:
        return _render_jinja(tok, turns, train_on_prompt, add_generation_prompt)
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


# --------------------------------------------------------------------------------------------
# Jinja templates of imported tokenizers

# Used when a Hugging Face tokenizer has no chat template (base models such as GPT-2): plain text
# headers, and each assistant turn closed by eos, which is where generation stops.
PLAIN_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### User:\\n' + message['content'] + '\\n\\n' }}"
    "{% else %}{{ '### Assistant:\\n' + message['content'] + eos_token + '\\n\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}"
)
# Private-use characters: no template filter changes them and no tokenizer special matches them.
PLACEHOLDER = "\ue000{}\ue001"
_SPLIT = re.compile("\ue000(\\d+)\ue001")


def _raise(message: str) -> NoReturn:
    raise jinja2.TemplateError(message)


@functools.lru_cache(maxsize=8)
def _compile(source: str) -> jinja2.Template:
    # The environment transformers uses for chat templates: a sandbox (no attribute access to
    # Python internals), trimmed blocks, loop controls, raise_exception and strftime_now.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise UserError(f"chat template: {e}") from None


def render_template(
    tok: Tokenizer, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool
) -> str:
    """The imported tokenizer's chat template rendered over `messages`, as a string."""
    assert isinstance(tok, ImportedTokenizer) and tok.chat_template is not None
    specials: dict[str, Any] = {f"{k}_token": v for k, v in tok.specials.items()}
    try:
        return _compile(tok.chat_template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, **specials
        )
    except jinja2.TemplateError as e:
        raise UserError(f"chat template: {e}") from None


def _render_jinja(
    tok: Tokenizer, turns: Sequence[Turn], train_on_prompt: bool, add_generation_prompt: bool
) -> tuple[list[int], list[bool]]:
    messages = [{"role": t.role, "content": PLACEHOLDER.format(i)} for i, t in enumerate(turns)]
    pieces: list[tuple[str, bool]] = []  # (template text with placeholders, trained)
    done = ""

    def extend(k: int, generation: bool, trained: bool) -> None:
        nonlocal done
        text = render_template(tok, messages[:k], add_generation_prompt=generation)
        if not text.startswith(done):
            raise UserError(
                "chat template: rendering more of a conversation changes what came before it, "
                "so the reply tokens cannot be told apart from the prompt"
            )
        pieces.append((text[len(done) :], trained))
        done = text

    for k, turn in enumerate(turns):
        if turn.role == "assistant":
            extend(k, True, train_on_prompt)  # the header that opens the reply
        extend(k + 1, False, train_on_prompt or turn.role == "assistant")
    if add_generation_prompt:
        extend(len(turns), True, train_on_prompt)

    ids: list[int] = []
    mask: list[bool] = []
    for text, trained in pieces:
        for j, part in enumerate(_SPLIT.split(text)):
            if j % 2:  # a placeholder: the message's content, as plain text
                new = tok.encode(turns[int(part)].content, allow_special=False)
            else:
                new = tok.encode(part) if part else []
            ids += new
            mask += [trained] * len(new)
    return ids, mask


def jinja_template(tok: Tokenizer) -> str:
    """The chat template a model trained with `tok` expects, as Jinja (for exports and configs)."""
    return tok.chat_template if tok.chat_template is not None else JINJA_TEMPLATE
