"""AI judges: critique, revise and compare responses under a constitution.

The feedback model of Constitutional AI (Bai et al., 2022) does three things, the `Judge`
protocol's three operations:

- `critique(prompt, response, principle)`: what is wrong with the response under a principle;
- `revise(prompt, response, critique, principle)`: the response rewritten to fix that;
- `compare(prompt, a, b)`: P(a is better than b), shown in that order. An LM judge reads it
  from its own normalised probabilities of answering "(A)" or "(B)" to the constitution's
  comparison question: the log-probability of each option's tokens after "The answer is:",
  softmaxed over the two (the paper's multiple-choice form). Position bias (a judge that
  favours whichever answer comes first) is removed by the caller, who asks both ways round.

Two judges implement it:

- `LMJudge`: any decoder lmforge loads (one of our chat checkpoints or a local Hugging Face
  model), prompted through its chat template; critiques and revisions are generated, few-shot
  examples from the constitution come first as earlier turns. Tiny CPU models critique badly:
  this is the door for a larger model.
- `RuleJudge`: deterministic, built on the task world's checkers. It knows the task example of
  each world prompt, so its critique names the flaw a principle's `rule` finds (a wrong answer,
  a story fact the story does not state, filler after the answer, a rude sentence), its
  revision fixes exactly that (the known answer put in; the filler or rudeness cut), and its
  comparison is a Bradley-Terry probability on the gold reward, with an optional bias toward
  the first position so that tests can check the debiasing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from lmforge.config import check, opt, to_dict
from lmforge.data.instruction import Message
from lmforge.data.world_tasks import (
    RUDE_SENTENCES,
    TaskExample,
    extract_answer,
    is_correct,
    is_impolite,
)
from lmforge.errors import UserError
from lmforge.feedback.constitution import Constitution, Principle, load_constitution
from lmforge.feedback.simulated import gold_reward
from lmforge.generation.generate import SamplingConfig, generate
from lmforge.models.decoder import Decoder
from lmforge.objectives.lm import token_logprobs
from lmforge.tokenizers import Tokenizer
from lmforge.tokenizers.chat import end_of_turn_id, render_chat

NO_FLAW = "No problems found."  # a critique that asks for no revision
OPTIONS = ("(A)", "(B)")
ANSWER_PREFIX = "The answer is:"  # the LM judge's reply starts here; an option follows


@dataclass(frozen=True, kw_only=True)
class JudgeConfig:
    model: str = opt(
        "rules",
        "the feedback model: 'rules' (the task world's checkers) or a model folder (an lmforge "
        "checkpoint or a local Hugging Face model)",
    )
    constitution: str = opt("world", "'world', 'chat' or a constitution .toml file")
    beta: float = opt(10.0, "rules: how sharply the gold-reward difference sets P(a better)")
    position_bias: float = opt(
        0.0, "rules: extra log-odds for the response shown first (to test position debiasing)"
    )
    max_new_tokens: int = opt(64, "model judge: longest critique or revision, in tokens")
    temperature: float = opt(0.0, "model judge: temperature of critiques and revisions (0: greedy)")
    seed: int = opt(0, "model judge: sampling seed")

    def __post_init__(self) -> None:
        check(bool(self.model), "model", "must be 'rules' or a model folder")
        check(self.beta >= 0, "beta", f"must be >= 0 (got {self.beta})")
        check(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        check(self.temperature >= 0, "temperature", "must be >= 0")


class Judge(Protocol):
    def critique(self, prompt: str, response: str, principle: Principle) -> str: ...

    def revise(self, prompt: str, response: str, critique: str, principle: Principle) -> str: ...

    def compare(self, prompt: str, a: str, b: str) -> float:
        """P(a better than b), a shown first."""
        ...

    def settings(self) -> dict[str, Any]:
        """What a record keeps about the judge."""
        ...


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


# ---------------------------------------------------------------------------------------------
# The rule-based judge


class RuleJudge:
    """The task world's checkers as a judge (see the module docstring)."""

    def __init__(self, cfg: JudgeConfig, examples: Iterable[TaskExample]):
        self.cfg = cfg
        self.examples = {ex.prompt: ex for ex in examples}

    def _example(self, prompt: str) -> TaskExample:
        ex = self.examples.get(prompt)
        if ex is None:
            raise UserError(
                f"the rule-based judge knows world prompts only, not {prompt[:60]!r}; "
                "use a model judge (--judge DIR)"
            )
        return ex

    def critique(self, prompt: str, response: str, principle: Principle) -> str:
        ex, answer = self._example(prompt), extract_answer(response)
        rest = _after_answer(response)
        if principle.rule == "correct" and not is_correct(ex, response):
            return f"The answer '{answer}' is wrong."
        if principle.rule == "grounded" and ex.task == "story_qa" and not is_correct(ex, response):
            return f"The story does not say that the answer is '{answer}'."
        if principle.rule == "concise" and rest not in ("", "."):
            return f"The response adds text after its answer: '{rest.lstrip('.').strip()}'"
        if principle.rule == "polite" and is_impolite(response):
            return "The response is rude: " + "; ".join(_rude(response))
        return NO_FLAW

    def revise(self, prompt: str, response: str, critique: str, principle: Principle) -> str:
        if critique == NO_FLAW:
            return response
        ex = self._example(prompt)
        if principle.rule in ("correct", "grounded"):
            return ex.answer + _after_answer(response, keep_stop=True)
        if principle.rule == "concise" and extract_answer(response):
            return extract_answer(response)
        if principle.rule == "polite":
            text = response
            for sentence in _rude(response):
                text = re.sub(re.escape(sentence), "", text, flags=re.IGNORECASE)
            return " ".join(text.split()) or ex.answer
        return response

    def compare(self, prompt: str, a: str, b: str) -> float:
        ex = self._example(prompt)
        gap = gold_reward(ex, a) - gold_reward(ex, b)
        return _sigmoid(self.cfg.beta * gap + self.cfg.position_bias)

    def settings(self) -> dict[str, Any]:
        keys = ("model", "beta", "position_bias")
        return {k: v for k, v in to_dict(self.cfg).items() if k in keys}


def _after_answer(response: str, keep_stop: bool = False) -> str:
    """The text after the answer segment (`extract_answer`, a prefix of the stripped response),
    stripped; with `keep_stop`, as it stands, to re-attach to a corrected answer."""
    tail = response.lstrip()[len(extract_answer(response)) :]
    return tail if keep_stop else tail.strip()


def _rude(response: str) -> list[str]:
    text = " ".join(response.split()).lower()
    return [s for s in RUDE_SENTENCES if s.lower() in text]


# ---------------------------------------------------------------------------------------------
# The language-model judge


class LMJudge:
    """A decoder prompted to critique, revise and choose (see the module docstring)."""

    def __init__(
        self, model: Decoder, tok: Tokenizer, constitution: Constitution, cfg: JudgeConfig
    ):
        self.model, self.tok, self.constitution, self.cfg = model.eval(), tok, constitution, cfg
        self.sampling = SamplingConfig(
            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed
        )

    def critique(self, prompt: str, response: str, principle: Principle) -> str:
        shots = [
            (_critique_request(ex.prompt, ex.response, principle), ex.critique)
            for ex in self.constitution.examples
        ]
        return self._reply(shots, _critique_request(prompt, response, principle))

    def revise(self, prompt: str, response: str, critique: str, principle: Principle) -> str:
        shots = [
            (_revision_request(ex.prompt, ex.response, ex.critique, principle), ex.revision)
            for ex in self.constitution.examples
        ]
        return self._reply(shots, _revision_request(prompt, response, critique, principle))

    def compare(self, prompt: str, a: str, b: str) -> float:
        question = (
            f"Consider this request and two responses.\nRequest: {prompt}\n"
            f"{OPTIONS[0]} {a}\n{OPTIONS[1]} {b}\n{self.constitution.comparison}"
        )
        ids, _ = render_chat(self.tok, [Message("user", question)], add_generation_prompt=True)
        ids += self.tok.encode(ANSWER_PREFIX, allow_special=False)
        logp = self._continuation_logprobs(ids, [f" {o}" for o in OPTIONS])
        return _sigmoid(logp[0] - logp[1])  # softmax over the two options

    def settings(self) -> dict[str, Any]:
        keys = ("model", "max_new_tokens", "temperature", "seed")
        return {k: v for k, v in to_dict(self.cfg).items() if k in keys}

    def _reply(self, shots: Sequence[tuple[str, str]], request: str) -> str:
        turns = [
            Message(role, text) for q, a in shots for role, text in (("user", q), ("assistant", a))
        ]
        ids, _ = render_chat(self.tok, [*turns, Message("user", request)],
                             add_generation_prompt=True)  # fmt: skip
        self._check_room(len(ids) + self.sampling.max_new_tokens - 1)
        out = generate(self.model, [ids], self.sampling, eos_id=end_of_turn_id(self.tok),
                       pad_id=self.tok.pad_id)  # fmt: skip
        return self.tok.decode(out[0]).strip()

    @torch.no_grad()
    def _continuation_logprobs(self, prefix: list[int], options: Sequence[str]) -> list[float]:
        """Summed log-probability of each option's tokens after `prefix`."""
        out = []
        for option in options:
            cont = self.tok.encode(option, allow_special=False)
            ids = prefix + cont
            self._check_room(len(ids))
            device = self.model.tok_emb.weight.device
            x = torch.tensor([ids[:-1]], device=device)  # (1, T-1)
            y = torch.tensor([ids[1:]], device=device)
            logp = token_logprobs(self.model(x), y)[0, len(prefix) - 1 :]  # (len(cont),)
            out.append(float(logp.sum()))
        return out

    def _check_room(self, n: int) -> None:
        limit = self.model.cfg.max_seq_len
        if n > limit:
            raise UserError(
                f"judge {self.cfg.model}: a judge prompt of {n} tokens exceeds the model's "
                f"context of {limit}; use a judge with a longer context or shorter examples"
            )


def _critique_request(prompt: str, response: str, principle: Principle) -> str:
    return f"Request: {prompt}\nResponse: {response}\nCritique request: {principle.critique}"


def _revision_request(prompt: str, response: str, critique: str, principle: Principle) -> str:
    return (
        f"{_critique_request(prompt, response, principle)}\nCritique: {critique}\n"
        f"Revision request: {principle.revision}\nReply with the revised response only."
    )


def make_judge(
    cfg: JudgeConfig,
    examples: Iterable[TaskExample] = (),
    load: Callable[[Path], tuple[Any, Tokenizer, Any]] | None = None,
) -> tuple[Judge, Constitution]:
    """The judge `cfg.model` names and its constitution: the rule-based judge (knowing the
    world `examples`), or an LM judge around the model `load` (`training.checkpoint.load_model`,
    passed in by the caller: feedback code sits below the training layer) reads from the folder."""
    constitution = load_constitution(cfg.constitution)
    if cfg.model == "rules":
        return RuleJudge(cfg, examples), constitution
    assert load is not None, "a model judge needs a loader"
    model, tok, _ = load(Path(cfg.model))
    if not isinstance(model, Decoder):
        raise UserError(f"judge {cfg.model}: a judge must be a decoder (a chat model)")
    return LMJudge(model, tok, constitution, cfg), constitution
