"""A Hugging Face model folder's tokenizer as an `ImportedTokenizer`.

Reads `tokenizer.json` (the fast-tokenizer file; the older vocab.json + merges.txt layout is
refused with the one-line conversion), the special tokens from `tokenizer_config.json` or
`special_tokens_map.json`, and the chat template from `tokenizer_config.json` or
`chat_template.jinja`. A tokenizer without a template gets `PLAIN_TEMPLATE`. No code from the
folder is run: the template is rendered in Jinja's sandbox.

Which token ends an assistant turn is read off the template itself: the first special token
after the reply's content (ChatML's `<|im_end|>`, Llama 3's `<|eot_id|>`), else eos. The eos of a
base model's tokenizer is often not the one its chat template closes turns with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmforge.errors import UserError
from lmforge.tokenizers.chat import PLACEHOLDER, PLAIN_TEMPLATE, render_template
from lmforge.tokenizers.core import TOKENIZER_FILE, ImportedTokenizer


def load_hf_tokenizer(folder: Path) -> ImportedTokenizer:
    """The tokenizer of the Hugging Face model folder `folder`; UserError naming what is wrong."""
    tok_path = folder / TOKENIZER_FILE
    if not tok_path.is_file():
        hint = ""
        if (folder / "vocab.json").is_file() or (folder / "tokenizer.model").is_file():
            hint = (
                " (it has a slow-tokenizer layout; convert it once with transformers: "
                "AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR))"
            )
        raise UserError(f"{tok_path}: file not found{hint}")
    try:
        text = tok_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{tok_path}: not UTF-8 ({e})") from None
    config = _read_json(folder / "tokenizer_config.json")
    token_map = _read_json(folder / "special_tokens_map.json")

    def special(name: str) -> str | None:
        for source in (config, token_map):
            value = source.get(f"{name}_token")
            if isinstance(value, dict):  # a serialized AddedToken
                value = value.get("content")
            if isinstance(value, str) and value:
                return value
        return None

    eos = special("eos")
    if eos is None:
        raise UserError(
            f"{folder}: no eos_token in tokenizer_config.json or special_tokens_map.json; "
            "lmforge needs it to know where a reply ends"
        )
    template = _chat_template(folder, config) or PLAIN_TEMPLATE
    specials = {"bos": special("bos") or eos, "eos": eos, "pad": special("pad") or eos}
    try:
        # end_of_turn is read off the template below; eos stands in while it is.
        tok = ImportedTokenizer(text, {**specials, "end_of_turn": eos}, template)
        tok.set_end_of_turn(_end_of_turn(tok) or eos)
        return tok
    except ValueError as e:
        raise UserError(f"{tok_path}: {e}") from None


def _chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def _end_of_turn(tok: ImportedTokenizer) -> str | None:
    """The first special token the template writes after an assistant reply's content."""
    messages = [
        {"role": "user", "content": PLACEHOLDER.format(0)},
        {"role": "assistant", "content": PLACEHOLDER.format(1)},
    ]
    text = render_template(tok, messages, add_generation_prompt=False)
    after = text.split(PLACEHOLDER.format(1), 1)[-1]
    for i in tok.encode(after):
        if i in tok.added_special_ids:
            return tok.id_to_token(i)
    return None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise UserError(f"{path}: invalid JSON: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data
