"""A multi-turn chat session over a fine-tuned model, rendered with the chat template.

The session keeps the conversation, renders it with `<|assistant|>` appended, and streams the
reply until `<|end_of_turn|>`. When the conversation outgrows the model's context, the oldest
exchanges are dropped (a system prompt stays), and the session says how many were dropped.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lmforge.data.instruction import Message
from lmforge.errors import UserError
from lmforge.generation.generate import SamplingConfig, generate_replies
from lmforge.models import Model
from lmforge.models.decoder import Decoder
from lmforge.models.encoder_decoder import EncoderDecoder
from lmforge.tokenizers import Tokenizer
from lmforge.tokenizers.chat import end_of_turn_id, render_chat


class ChatSession:
    def __init__(
        self, model: Model, tok: Tokenizer, sampling: SamplingConfig, system: str = ""
    ) -> None:
        if not isinstance(model, Decoder | EncoderDecoder):
            raise UserError("chat: an encoder cannot generate; chat with a decoder")
        self.model: Decoder | EncoderDecoder = model
        self.tok, self.sampling = tok, sampling
        self.system = [Message("system", system)] if system else []
        self.turns: list[Message] = []
        self.dropped = 0  # exchanges dropped to fit the context

    def reset(self) -> None:
        self.turns, self.dropped = [], 0

    def _prompt(self) -> list[int]:
        seq2seq = isinstance(self.model, EncoderDecoder)
        room = self.model.cfg.max_seq_len - (0 if seq2seq else self.sampling.max_new_tokens)
        while True:
            ids = render_chat(self.tok, self.system + self.turns, add_generation_prompt=True)[0]
            if len(ids) <= room:
                return ids
            if len(self.turns) <= 1:
                raise UserError(
                    f"chat: the message is {len(ids)} tokens; with max_new_tokens="
                    f"{self.sampling.max_new_tokens} the model's context of "
                    f"{self.model.cfg.max_seq_len} holds at most {room}"
                )
            self.turns, self.dropped = self.turns[2:], self.dropped + 1

    def reply(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        """Add a user turn, generate the reply (streamed to `on_text` piece by piece), keep it."""
        self.turns.append(Message("user", text))
        try:
            prompt = self._prompt()
        except UserError:
            self.turns.pop()
            raise
        new: list[int] = []
        shown = ""
        eot = end_of_turn_id(self.tok)

        def stream(nxt: torch.Tensor) -> None:
            nonlocal shown
            t = int(nxt[0])
            if t == eot or on_text is None:
                return
            new.append(t)
            text = self.tok.decode(new)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                on_text(text[len(shown) :])
                shown = text

        ids = generate_replies(
            self.model, [prompt], self.sampling, self.tok, eos_id=eot, on_step=stream
        )[0]
        answer = self.tok.decode(ids)
        if on_text is not None and len(answer) > len(shown):
            on_text(answer[len(shown) :])
        self.turns.append(Message("assistant", answer))
        return answer
