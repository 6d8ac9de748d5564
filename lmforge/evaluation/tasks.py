"""Exact-match accuracy on the world's held-out instruction tasks, greedy decoding.

A chat model (any stage after SFT) gets each task prompt through the chat template and answers
until `<|end_of_turn|>`. A base model has never seen the template, so it gets a few-shot prompt
in plain text (`Question: ... Answer: ...` shots from the training split, same task) and its
answer is cut at the first newline. Both are scored by the world's checker (`is_correct`).

Besides accuracy per task (and their macro mean), the row reports the mean gold reward of the
greedy answers (0-1, `gold_greedy`), how often generations stop on their own (`stop_rate`:
end-of-turn for chat models, a newline or end-of-text for base models) and the share of answers
that ramble or are impolite, the flaws alignment is meant to remove.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from tqdm import tqdm

from lmforge.config import check, opt
from lmforge.data.instruction import Message
from lmforge.data.world_tasks import (
    TaskExample,
    few_shot_prompt,
    is_correct,
    is_impolite,
    is_rambling,
)
from lmforge.errors import UserError
from lmforge.feedback.simulated import gold_score
from lmforge.generation.generate import SamplingConfig, generate_replies
from lmforge.models import Model
from lmforge.models.decoder import Decoder
from lmforge.models.encoder_decoder import EncoderDecoder
from lmforge.tokenizers import Tokenizer
from lmforge.tokenizers.chat import end_of_turn_id, render_chat


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    split: Literal["val", "test"] = opt("test", "held-out split of the world's tasks")
    limit: int = opt(0, "prompts per task (0: the whole split)")
    few_shot: int = opt(3, "base models only: solved examples shown before each question")
    max_new_tokens: int = opt(48, "longest answer generated")
    batch_size: int = opt(32, "prompts generated together")
    samples: int = opt(
        1, "chat models: sampled responses per prompt for gold reward, reward score, KL (0: off)"
    )
    temperature: float = opt(1.0, "temperature of those samples (RL's rollout temperature)")
    seed: int = opt(0, "seed of those samples")

    def __post_init__(self) -> None:
        check(self.samples >= 0, "samples", "must be >= 0")
        check(self.temperature > 0, "temperature", "must be > 0")
        check(self.limit >= 0, "limit", "must be >= 0")
        check(self.few_shot >= 0, "few_shot", "must be >= 0")
        check(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")


@dataclass(frozen=True)
class Answer:
    example: TaskExample
    response: str
    stopped: bool  # ended on its own rather than at max_new_tokens
    correct: bool


def chat_prompt(tok: Tokenizer, prompt: str) -> list[int]:
    """Ids of a one-turn user prompt, ending with `<|assistant|>`."""
    return render_chat(tok, [Message("user", prompt)], add_generation_prompt=True)[0]


def base_prompt(
    tok: Tokenizer, query: TaskExample, shots: Sequence[TaskExample], room: int
) -> list[int]:
    """A few-shot prompt with as many of `shots` as fit in `room` tokens (at least none; a
    query too long even alone is returned whole, for the caller to cut)."""
    for k in range(len(shots), -1, -1):
        # <|eos|> first: the base model saw documents separated by it, so a prompt starts anew.
        ids = [tok.eos_id] + tok.encode(few_shot_prompt(shots[:k], query), allow_special=False)
        if len(ids) <= room or k == 0:
            return ids
    raise AssertionError("unreachable")


def summarize(answers: Sequence[Answer]) -> dict[str, Any]:
    """Exact match per task (`em/<task>`), their macro mean `em`, and answer statistics."""
    by_task: dict[str, list[Answer]] = defaultdict(list)
    for a in answers:
        by_task[a.example.task].append(a)
    row: dict[str, Any] = {
        f"em/{task}": sum(a.correct for a in xs) / len(xs) for task, xs in by_task.items()
    }
    n = len(answers)
    row["em"] = sum(row.values()) / len(by_task)
    row["gold_greedy"] = sum(gold_score(a.example, a.response, a.stopped) for a in answers) / len(
        answers
    )
    row["stop_rate"] = sum(a.stopped for a in answers) / n
    row["rambling_rate"] = sum(is_rambling(a.response) for a in answers) / n
    row["impolite_rate"] = sum(is_impolite(a.response) for a in answers) / n
    row["n_prompts"] = n
    return row


def evaluate_tasks(
    model: Model,
    tok: Tokenizer,
    examples: Sequence[TaskExample],
    cfg: EvalConfig,
    *,
    chat: bool,
    shots: dict[str, list[TaskExample]] | None = None,
    progress: bool = False,
) -> tuple[dict[str, Any], list[Answer]]:
    """Greedy answers to every example (batched), and the metrics row they make. A prompt
    longer than the context leaves room for loses its start (the question is at its end);
    `prompts_cut` counts them."""
    if not isinstance(model, Decoder | EncoderDecoder):
        raise UserError("eval: an encoder cannot generate answers; evaluate a decoder")
    t0 = time.perf_counter()
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=0.0)
    room = model.cfg.max_seq_len - (0 if isinstance(model, EncoderDecoder) else cfg.max_new_tokens)
    if room < 1:
        raise UserError(
            f"eval: max_new_tokens={cfg.max_new_tokens} leaves no room for a prompt in the "
            f"model's context of {model.cfg.max_seq_len} tokens"
        )
    stop_id = end_of_turn_id(tok) if chat else tok.eos_id
    out: list[Answer] = []
    cut = 0
    bar = tqdm(total=len(examples), desc="eval", unit="prompt", disable=not progress)
    for i in range(0, len(examples), cfg.batch_size):
        batch = examples[i : i + cfg.batch_size]
        if chat:
            full = [chat_prompt(tok, ex.prompt) for ex in batch]
        else:
            full = [base_prompt(tok, ex, (shots or {}).get(ex.task, []), room) for ex in batch]
        cut += sum(len(p) > room for p in full)
        prompts = [p[-room:] for p in full]
        new = generate_replies(model, prompts, sampling, tok, eos_id=stop_id)
        for ex, ids in zip(batch, new, strict=True):
            stopped = len(ids) < cfg.max_new_tokens  # the stop token took a slot
            text = tok.decode(ids)
            if not chat:  # the answer is the rest of the "Answer:" line
                stopped = stopped or "\n" in text
                text = text.split("\n", 1)[0].strip()
            out.append(Answer(ex, text, stopped, is_correct(ex, text)))
        bar.update(len(batch))
    bar.close()
    row = summarize(out)
    row["prompts_cut"] = cut
    row["eval_s"] = time.perf_counter() - t0
    return row, out


def limit_per_task(examples: Sequence[TaskExample], limit: int) -> list[TaskExample]:
    """The first `limit` examples of each task (all when limit is 0), in the split's order."""
    if limit == 0:
        return list(examples)
    seen: dict[str, int] = defaultdict(int)
    out = []
    for ex in examples:
        if seen[ex.task] < limit:
            seen[ex.task] += 1
            out.append(ex)
    return out
