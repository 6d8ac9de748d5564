"""Sampling K responses per prompt: the raw material of preference data.

Prompts come from the world's instruction tasks (a split of `data/world_tasks.py`, so that the
reward model's held-out prompts stay unseen) or from a .jsonl file of `{"prompt": "..."}` or
`{"messages": [...]}` records. Each prompt is rendered with the chat template and repeated K
times in a batch; generation uses the KV cache and stops at end-of-turn. One record per prompt
(the `responses.jsonl` layout that `lmforge label` and the ranking page read):

    {"id", "messages", "responses", "stopped", "task"?, "answer"?, "sampling", "model"}
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lmforge.config import check, opt, to_dict
from lmforge.data.corpora import read_jsonl
from lmforge.data.instruction import Message, json_kind, parse_record
from lmforge.data.world_tasks import SPLITS, TaskConfig, TaskExample, make_splits
from lmforge.errors import UserError, where
from lmforge.generation.generate import SamplingConfig, generate_replies
from lmforge.models import Model
from lmforge.models.decoder import Decoder
from lmforge.models.encoder_decoder import EncoderDecoder
from lmforge.tokenizers import Tokenizer
from lmforge.tokenizers.chat import end_of_turn_id, render_chat


@dataclass(frozen=True, kw_only=True)
class SampleConfig:
    n: int = opt(4, "responses per prompt (K)")
    split: str = opt("train", "world prompts: which split of the tasks (train, val, test, rl)")
    limit: int = opt(0, "prompts to use (0: all); world prompts are interleaved across tasks")
    batch_size: int = opt(64, "sequences generated together (prompts x K)")
    sampling: SamplingConfig = opt(
        SamplingConfig(temperature=1.0, max_new_tokens=48), "temperature, top-p, length, seed"
    )
    tasks: TaskConfig = opt(TaskConfig(), "the world's tasks, for world prompts")

    def __post_init__(self) -> None:
        check(self.n >= 1, "n", f"must be >= 1 (got {self.n})")
        check(self.split in SPLITS, "split", f"must be one of {', '.join(SPLITS)}")
        check(self.limit >= 0, "limit", "must be >= 0")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")


@dataclass(frozen=True)
class Prompt:
    id: str
    messages: tuple[Message, ...]
    task: str | None = None
    answer: str | None = None


def task_prompts(examples: Sequence[TaskExample], split: str) -> list[Prompt]:
    """World task examples as one-turn prompts that keep their task and answer."""
    return [
        Prompt(f"world:{split}:{i}", (Message("user", ex.prompt),), ex.task, ex.answer)
        for i, ex in enumerate(examples)
    ]


def world_prompts(cfg: SampleConfig) -> list[Prompt]:
    out = task_prompts(make_splits(cfg.tasks)[cfg.split], cfg.split)
    return out[: cfg.limit] if cfg.limit else out


def file_prompts(path: Path, limit: int = 0) -> list[Prompt]:
    """Prompts from .jsonl: {"prompt": str} or {"messages": [...]} ending with a user turn."""
    out = []
    for line, rec in read_jsonl(path):
        if not isinstance(rec, dict):
            raise UserError(f"{where(path, line)}: expected a JSON object")
        if isinstance(rec.get("prompt"), str):
            msgs: tuple[Message, ...] = (Message("user", rec["prompt"]),)
            if not rec["prompt"].strip():
                raise UserError(f"{where(path, line, 'prompt')}: empty prompt")
        elif "messages" in rec:
            if not isinstance(rec["messages"], list):
                got = json_kind(rec["messages"])
                raise UserError(f"{where(path, line, 'messages')}: expected a list, got {got}")
            # Reuse the chat validation with a placeholder reply, then drop it.
            conv = parse_record(
                {"messages": [*rec["messages"], {"role": "assistant", "content": "-"}]}, path, line
            )
            msgs = conv.messages[:-1]
        else:
            raise UserError(f"{where(path, line)}: expected a 'prompt' string or 'messages'")
        pid = rec.get("id", f"{path.name}:{line}")
        out.append(Prompt(str(pid), msgs, rec.get("task"), rec.get("answer")))
    if not out:
        raise UserError(f"{path}: no prompts")
    return out[:limit] if limit else out


def prompt_ids(tok: Tokenizer, prompts: Sequence[Prompt]) -> list[list[int]]:
    """Each prompt rendered with the chat template, ending with `<|assistant|>`."""
    return [render_chat(tok, p.messages, add_generation_prompt=True)[0] for p in prompts]


def check_room(
    prompts: Sequence[Prompt],
    ids: Sequence[Sequence[int]],
    context: int,
    room: int,
    max_new_tokens: int,
    prefix: str = "",
) -> None:
    """Refuse, naming the first, a prompt longer than the `room` its answer leaves it."""
    for p, x in zip(prompts, ids, strict=True):
        if len(x) > room:
            raise UserError(
                f"{prefix}prompt {p.id} is {len(x)} tokens; the model's context of {context} "
                f"leaves room for {room} with max_new_tokens={max_new_tokens}"
            )


def fitting(tok: Tokenizer, prompts: Sequence[Prompt], room: int) -> list[Prompt]:
    """The prompts whose rendering fits in `room` tokens (for world prompts, where a small
    model's context may not hold the long stories: those are left out, not refused)."""
    return [p for p, x in zip(prompts, prompt_ids(tok, prompts), strict=True) if len(x) <= room]


def sample_responses(
    model: Model,
    tok: Tokenizer,
    prompts: Sequence[Prompt],
    cfg: SampleConfig,
    model_name: str = "",
    progress: bool = True,
) -> list[dict[str, Any]]:
    """K responses per prompt, as responses.jsonl records."""
    if not isinstance(model, Decoder | EncoderDecoder):
        raise UserError("sample: an encoder cannot generate; use a decoder")
    seq2seq = isinstance(model, EncoderDecoder)
    room = model.cfg.max_seq_len - (0 if seq2seq else cfg.sampling.max_new_tokens)
    eot = end_of_turn_id(tok)
    ids = prompt_ids(tok, prompts)
    check_room(prompts, ids, model.cfg.max_seq_len, room, cfg.sampling.max_new_tokens, "sample: ")
    rows = [(i, x) for i, x in enumerate(ids) for _ in range(cfg.n)]
    texts: list[list[str]] = [[] for _ in prompts]
    stopped: list[list[bool]] = [[] for _ in prompts]
    bar = tqdm(total=len(rows), desc="sample", unit="response", disable=not progress)
    for b, start in enumerate(range(0, len(rows), cfg.batch_size)):
        chunk = rows[start : start + cfg.batch_size]
        # A distinct seed per batch: the same config always draws the same responses.
        sampling = SamplingConfig(**{**to_dict(cfg.sampling), "seed": cfg.sampling.seed + b})
        batch = [x for _, x in chunk]
        new = generate_replies(model, batch, sampling, tok, eos_id=eot)
        for (i, _), out in zip(chunk, new, strict=True):
            texts[i].append(tok.decode(out))
            stopped[i].append(len(out) < cfg.sampling.max_new_tokens)
        bar.update(len(chunk))
    bar.close()
    records = []
    for p, rs, st in zip(prompts, texts, stopped, strict=True):
        rec: dict[str, Any] = {
            "id": p.id,
            "messages": [{"role": m.role, "content": m.content} for m in p.messages],
            "responses": rs,
            "stopped": st,
        }
        if p.task is not None:
            rec["task"], rec["answer"] = p.task, p.answer
        rec["sampling"] = to_dict(cfg.sampling)
        rec["model"] = model_name
        records.append(rec)
    return records
