"""The eval stage: score a model folder on the world's held-out tasks and record the result.

Lives beside the trainers because it reads checkpoints (`training/checkpoint.py`); the scoring
itself is `evaluation/tasks.py`. A base model (from `pretrain`) is scored few-shot; any later
stage's model through the chat template. The task splits are the ones the model was fine-tuned
against (its run config's `tasks`), so test prompts are never training prompts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from lmforge.config import build, to_dict
from lmforge.data.world_tasks import TaskConfig, TaskExample, make_splits
from lmforge.errors import UserError
from lmforge.evaluation.tasks import EvalConfig, evaluate_tasks, limit_per_task
from lmforge.feedback.sampling import fitting, task_prompts
from lmforge.generation.generate import SamplingConfig
from lmforge.io import atomic_dir
from lmforge.models.decoder import Decoder
from lmforge.training.align import load_reward
from lmforge.training.checkpoint import load_model
from lmforge.training.rollout import sample_metrics

EVAL_FILES = ("metrics.jsonl", "answers.jsonl")


def task_config_of(config: dict[str, Any], source: str) -> TaskConfig:
    """The task world a model was fine-tuned on (defaults for a base model)."""
    tasks = config.get("run", {}).get("tasks")
    return build(TaskConfig, tasks, source) if isinstance(tasks, dict) else TaskConfig()


def evaluate(
    model_dir: Path,
    cfg: EvalConfig,
    out: Path,
    *,
    reward_model: Path | None = None,
    reference: Path | None = None,
    tasks: TaskConfig | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score the model in `model_dir` on `tasks` (default: the tasks it was fine-tuned on, or
    every task for a base model); write `out/metrics.jsonl` and `out/answers.jsonl`
    (replacing an earlier eval there) and return the metrics row.

    A chat model is also sampled (`cfg.samples` per prompt at `cfg.temperature`): the mean gold
    reward of the samples, with `reward_model` their reward-model score, and with `reference`
    (typically the SFT model) the policy's KL to it, nats per response."""
    if out.exists() and not (out.is_dir() and set(os.listdir(out)) <= set(EVAL_FILES)):
        raise UserError(f"{out}: exists and is not an eval folder; choose another --out")
    model, tok, config = load_model(model_dir)
    rm = load_reward(str(reward_model), tok, torch.device("cpu")) if reward_model else None
    ref: Decoder | None = None
    if reference is not None:
        loaded, ref_tok, _ = load_model(reference)
        if ref_tok.fingerprint != tok.fingerprint or not isinstance(loaded, Decoder):
            raise UserError(f"reference: {reference} is not a decoder with the model's tokenizer")
        ref = loaded
    tasks = tasks or task_config_of(config, str(model_dir / "config.json"))
    splits = make_splits(tasks)
    examples = limit_per_task(splits[cfg.split], cfg.limit)
    chat = config.get("stage") != "pretrain"
    shots: dict[str, list[TaskExample]] = {}
    for ex in splits["train"]:  # the first few training examples of each task
        if len(shots.setdefault(ex.task, [])) < cfg.few_shot:
            shots[ex.task].append(ex)
    row, answers = evaluate_tasks(
        model, tok, examples, cfg, chat=chat, shots=shots, progress=progress
    )
    if chat and cfg.samples and isinstance(model, Decoder):
        sampling = SamplingConfig(
            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed
        )
        # Prompts too long to leave room for an answer (long stories, small models) are left
        # out of the sampled part; the greedy part above cuts them from the left instead.
        room = model.cfg.max_seq_len - cfg.max_new_tokens
        fits = fitting(tok, task_prompts(examples, cfg.split), room)
        if fits:
            prompts = [p for p in fits for _ in range(cfg.samples)]
            sampled, _ = sample_metrics(model, tok, prompts, sampling, reference=ref, rm=rm)
            row.update(sampled, n_sampled_prompts=len(fits))
    row = {
        "stage": "eval",
        "model": str(model_dir),
        "model_stage": config.get("stage"),
        "mode": "chat" if chat else f"{cfg.few_shot}-shot",
        "split": cfg.split,
        **row,
        "config": to_dict(cfg),
    }
    with atomic_dir(out) as tmp:
        (tmp / "metrics.jsonl").write_text(json.dumps(row) + "\n", encoding="utf-8")
        lines = (
            json.dumps(
                {
                    "task": a.example.task,
                    "prompt": a.example.prompt,
                    "answer": a.example.answer,
                    "response": a.response,
                    "correct": a.correct,
                    "stopped": a.stopped,
                }
            )
            + "\n"
            for a in answers
        )
        (tmp / "answers.jsonl").write_text("".join(lines), encoding="utf-8")
    return row


def eval_table(row: dict[str, Any]) -> list[str]:
    """The metrics row as a small text table."""
    cut = f", {row['prompts_cut']} cut to fit the context" if row.get("prompts_cut") else ""
    lines = [
        f"{row['model']} ({row['mode']}, {row['split']} split, {row['n_prompts']} prompts{cut})"
    ]
    tasks = sorted(k for k in row if k.startswith("em/"))
    width = max(len(k) - 3 for k in [*tasks, "em/KL to reference"])
    for k in tasks:
        lines.append(f"  {k[3:]:<{width}}  {row[k]:.3f}")
    lines.append(f"  {'mean':<{width}}  {row['em']:.3f}")
    lines.append(f"  {'stop rate':<{width}}  {row['stop_rate']:.3f}")
    lines.append(f"  {'rambling':<{width}}  {row['rambling_rate']:.3f}")
    lines.append(f"  {'impolite':<{width}}  {row['impolite_rate']:.3f}")
    lines.append(f"  {'gold (greedy)':<{width}}  {row['gold_greedy']:.3f}")
    labels = {"gold": "gold (sampled)", "rm_score": "reward model", "kl": "KL to reference"}
    for key, label in labels.items():
        if key in row:
            lines.append(f"  {label:<{width}}  {row[key]:.3f}")
    return lines
