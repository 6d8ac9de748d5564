"""Supervised fine-tuning: a pretrained model learns to answer instructions in the chat format.

`sft(cfg, out)` validates the instruction data (the world's tasks, or files in the formats of
`data/instruction.py`) before any model is built, renders every conversation with the chat
template, loads the base model and runs a plain loop: rows -> forward -> loss on the reply
tokens (and their end-of-turn) -> backward -> clip -> step -> schedule -> log -> eval ->
checkpoint. Decoders train on packed rows (examples separated by a block-diagonal mask) or on
padded rows; encoder-decoders read the prompt and produce the reply (FLAN style).

Every piece of state a step depends on is in the checkpoint (the rows of step s are a pure
function of the seed and s), so a killed run resumed with `resume=True` repeats the same losses.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from lmforge import distributed
from lmforge.config import check, opt, to_dict
from lmforge.data.instruction import Message, hold_out_tail, load_instructions
from lmforge.data.sft_batches import (
    Examples,
    Layout,
    RowSampler,
    best_fit,
    collate,
    render_examples,
    render_seq2seq_examples,
)
from lmforge.data.world_tasks import TaskConfig, TaskExample, make_splits, sft_records
from lmforge.errors import UserError
from lmforge.evaluation.tasks import EvalConfig, evaluate_tasks, limit_per_task
from lmforge.models import Model
from lmforge.models.encoder_decoder import EncoderDecoder
from lmforge.objectives.lm import IGNORE_INDEX, token_loss
from lmforge.runtime import DTYPES, autocast, call, seed_everything, to_device
from lmforge.tokenizers import Tokenizer
from lmforge.tokenizers.chat import Turn, jinja_template
from lmforge.training.checkpoint import load_model, load_state
from lmforge.training.guard import StepGuard
from lmforge.training.loop import (
    Throughput,
    TrainConfig,
    due,
    end_step,
    saver,
    setup_device,
    step_bar,
    train_step,
)
from lmforge.training.optim import OptimConfig, build_optimizer, lr_at, set_lr
from lmforge.training.preempt import on_sigterm
from lmforge.training.rundir import (
    check_resume_config,
    check_run_dir,
    final_row,
    open_run_files,
    run_dir,
)
from lmforge.training.trackers import check_trackers


@dataclass(frozen=True, kw_only=True)
class SFTConfig:
    model: str = opt("", "base model folder (from `lmforge pretrain`, or an earlier SFT)")
    data: tuple[str, ...] = opt(
        ("world",),
        "instruction data: 'world' (the task world's instruction tasks), .json/.jsonl files "
        "(Alpaca, Dolly, chat messages, prompt/completion) or hf:NAME[:SPLIT]",
    )
    val_data: tuple[str, ...] = opt(
        (), "held-out instruction data; empty: the world's val split or the last val_fraction"
    )
    val_fraction: float = opt(0.05, "share of the examples held out when no val_data is given")
    tasks: TaskConfig = opt(
        TaskConfig(n_train=2000), "the world's instruction tasks (data 'world')"
    )
    layout: Literal["auto", "packed", "padded"] = opt(
        "auto",
        "decoder rows: packed (several examples per row, each attending only to itself) or "
        "padded (one per row); auto: packed for decoders, padded for encoder-decoders",
    )
    train_on_prompt: bool = opt(
        False, "decoders: also train on prompt tokens (not only on the replies)"
    )
    eval_prompts: int = opt(
        20, "world data: held-out prompts per task scored by exact match at each eval (0: off)"
    )
    optim: OptimConfig = opt(
        OptimConfig(lr=1e-3, warmup_steps=20, weight_decay=0.0), "optimizer and schedule"
    )
    train: TrainConfig = opt(
        TrainConfig(max_steps=1000, batch_size=8, eval_every=250, ckpt_every=250, eval_blocks=32),
        "training loop (batch_size counts rows; a packed row holds several examples)",
    )

    def __post_init__(self) -> None:
        check(bool(self.model), "model", "give the base model folder (--model DIR)")
        check(len(self.data) > 0, "data", "give at least one input (or 'world')")
        check(0 < self.val_fraction < 1, "val_fraction", "must be in (0, 1)")
        check(self.eval_prompts >= 0, "eval_prompts", "must be >= 0")


@dataclass(frozen=True)
class SFTData:
    train: list[tuple[Message, ...]]
    val: list[tuple[Message, ...]]
    world: bool  # the world's tasks: exact match can be scored


def load_sft_data(cfg: SFTConfig) -> SFTData:
    """Read and validate every conversation before any model is built."""
    world = cfg.data == ("world",)
    if world:
        train = [_turns(r["messages"]) for r in sft_records(cfg.tasks, "train")]
        val = [_turns(r["messages"]) for r in sft_records(cfg.tasks, "val", flawed=False)]
    elif "world" in cfg.data:
        raise UserError("data: 'world' cannot be mixed with files; give one or the other")
    else:
        train = [c.messages for c in load_instructions(cfg.data)]
        if cfg.val_data:
            val = [c.messages for c in load_instructions(cfg.val_data)]
        else:
            train, val = hold_out_tail(train, cfg.val_fraction, "example(s)")
    return SFTData(train, val, world)


def _turns(messages: list[dict[str, str]]) -> tuple[Message, ...]:
    return tuple(Message(m["role"], m["content"]) for m in messages)


def resolve_layout(cfg: SFTConfig, model: Model) -> Layout:
    seq2seq = isinstance(model, EncoderDecoder)
    if seq2seq and cfg.layout == "packed":
        raise UserError("layout: packing is for decoders; use padded for an encoder-decoder")
    if seq2seq:
        return "seq2seq"
    return "packed" if cfg.layout == "auto" else cfg.layout


def build_examples(
    tok: Tokenizer, convs: Sequence[Sequence[Turn]], layout: Layout, block: int, cfg: SFTConfig
) -> Examples:
    if layout == "seq2seq":
        return render_seq2seq_examples(tok, convs, block)
    return render_examples(tok, convs, block, train_on_prompt=cfg.train_on_prompt)


def model_forward(
    model: Callable[..., torch.Tensor], layout: Layout
) -> Callable[..., torch.Tensor]:
    """The forward pass for a collated batch (see `data/sft_batches.collate`)."""
    if layout == "packed":
        return lambda x, positions, mask: model(x, positions=positions, mask=mask)
    return model  # padded: model(x); seq2seq: model(src, tgt, src_mask)


def sft(
    cfg: SFTConfig,
    out: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the SFT stage into `out`; return the final metrics row."""
    state = check_run_dir(out, resume=resume, overwrite=overwrite)
    check_trackers(cfg.train.trackers)
    if state is not None:
        check_resume_config(to_dict(cfg), out)
    base = Path(cfg.model)
    if base.resolve() == out.resolve():
        raise UserError(f"model: {base} is the output folder; write the SFT model elsewhere")
    data = load_sft_data(cfg)
    device, dtype = setup_device(cfg.train, multi_process=True)
    world, rank = distributed.world_size(), distributed.rank()
    share = distributed.batch_share(cfg.train.batch_size, cfg.train.grad_accum, world, rank)
    progress = progress and distributed.is_main()
    model, tok, base_config = load_model(base)
    if base_config["family"] == "encoder":
        raise UserError(f"model: {base} is an encoder; SFT needs a decoder or encoder-decoder")
    seed_everything(cfg.train.seed)
    model = model.to(device).train()
    layout = resolve_layout(cfg, model)
    block = cfg.train.block_size or model.cfg.max_seq_len
    if block > model.cfg.max_seq_len:
        raise UserError(
            f"train.block_size: {block} exceeds the base model's context {model.cfg.max_seq_len}"
        )
    train_ex = build_examples(tok, data.train, layout, block, cfg)
    val_ex = build_examples(tok, data.val, layout, block, cfg)
    sampler = RowSampler(train_ex, block, layout, cfg.train.seed)
    val_rows = _val_rows(val_ex, block, layout, cfg.train.eval_blocks)
    eval_set = _eval_examples(cfg) if data.world and cfg.eval_prompts else []
    ddp = distributed.wrap(model, device, cfg.train.dist, dtype)  # the model in one process
    optimizer = build_optimizer(model, cfg.optim)  # after wrap: FSDP replaces the parameters
    fwd = model_forward(torch.compile(ddp) if cfg.train.compile else ddp, layout)
    run_config: dict[str, Any] = {
        "stage": "sft",
        "family": base_config["family"],
        "objective": "sft",
        "extra_vocab": base_config.get("extra_vocab", 0),
        "base_model": str(base),
        "chat_template": jinja_template(tok),
        "run": to_dict(cfg),
        "model": to_dict(model.cfg),
        "tokenizer_fingerprint": tok.fingerprint,
    }

    guard = StepGuard(cfg.train)
    with run_dir(out, fresh=state is None, overwrite=overwrite), on_sigterm() as sigterm:
        start = 0
        if state is not None:
            saved = load_state(state, model, optimizer)
            start = saved["step"]
            guard.load_state_dict(saved.get("guard"))
            dtype = DTYPES[saved["autocast"]]
        metrics = open_run_files(
            out, tok, run_config, start, fresh=state is None, trackers=cfg.train.trackers
        )
        if state is None:
            metrics.log(
                {
                    "step": 0,
                    "n_train": len(train_ex),
                    "n_val": len(val_ex),
                    "train_tokens": train_ex.n_trained,
                    "truncated": train_ex.n_truncated,
                    "dropped": train_ex.n_dropped,
                    "layout": layout,
                    "autocast": str(dtype).removeprefix("torch."),
                }
            )
        if progress:
            tqdm.write(
                f"sft: {len(train_ex)} examples ({train_ex.n_trained:,} reply tokens, "
                f"{train_ex.n_truncated} cut to {block} tokens, {train_ex.n_dropped} dropped: "
                f"no reply within the block), {layout} rows | "
                f"{device} {str(dtype).removeprefix('torch.')} | "
                + (f"resuming at step {start}" if start else f"from {base}")
            )
        if start >= cfg.train.max_steps:
            metrics.close()
            distributed.print0(
                f"{out}: already complete at step {start} (raise train.max_steps to extend)"
            )
            return final_row(out)

        save = saver(out, model, optimizer, run_config, dtype, cfg.train, guard)

        bar = step_bar("sft", cfg.train.max_steps, start, progress)
        meter = Throughput()
        last: dict[str, Any] = {}
        t_start = time.perf_counter()
        rows_per_step = cfg.train.batch_size * cfg.train.grad_accum
        for step in range(start, cfg.train.max_steps):
            lr = lr_at(step, cfg.train.max_steps, cfg.optim)
            set_lr(optimizer, lr, cfg.optim.lr)
            first = step * rows_per_step
            micro, real, width = [], 0, 0  # this rank's rows: their example tokens and slots
            for m in share.micro:
                rows = sampler.rows(first + m * cfg.train.batch_size, cfg.train.batch_size)
                x, y = collate(train_ex, rows, layout, block)
                micro.append((x, y))
                real += train_ex.slots_in(rows[share.rows])
                width += y[share.rows].numel()
            loss, grad_norm = train_step(
                ddp,
                optimizer,
                micro,
                token_loss,
                n_micro=cfg.train.grad_accum,
                device=device,
                dtype=dtype,
                grad_clip=cfg.optim.grad_clip,
                step=step + 1,
                forward=fwd,
                rows=share.rows,
                guard=guard,
            )
            meter.add(real)

            done = step + 1
            bar.update(1)
            row: dict[str, Any] = {}
            if due(done, cfg.train.log_every, cfg.train.max_steps):
                tps, real_all, width_all = distributed.all_sum(meter.rate(), real, width)
                row = {
                    "step": done,
                    "loss": loss.item(),
                    "lr": lr,
                    "grad_norm": grad_norm.item(),
                    **guard.counts(),
                    "tokens_per_s": tps,
                    "padding": 1 - real_all / width_all,
                    "epoch": sampler.epoch_of(first + rows_per_step),
                    "elapsed_s": time.perf_counter() - t_start,
                }
                bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{tps:,.0f}")
            t_pause = time.perf_counter()
            if due(done, cfg.train.eval_every, cfg.train.max_steps):
                # every rank evaluates the same rows, so none waits on rank 0 in the next step
                row.setdefault("step", done)
                row["val_loss"] = val_loss(
                    model, fwd, val_ex, val_rows, layout, block, device, dtype
                )
                if eval_set:
                    em, _ = evaluate_tasks(model, tok, eval_set, EvalConfig(), chat=True)
                    row.update({f"val_{k}": v for k, v in em.items()})
                    model.train()
                if progress:
                    extra = f" exact match {row['val_em']:.3f}" if eval_set else ""
                    bar.write(f"step {done}: val_loss {row['val_loss']:.4f}{extra}")
            if row:
                metrics.log(row)
                last.update(row)
            end_step(done, cfg.train, sigterm, metrics, save)
            meter.exclude(time.perf_counter() - t_pause)
        bar.close()
        metrics.close()
    return last


@torch.no_grad()
def val_loss(
    model: Model,
    fwd: Callable[..., torch.Tensor],
    examples: Examples,
    rows: list[list[int]],
    layout: Layout,
    block: int,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int = 16,
) -> float:
    """Mean loss per trained token over fixed held-out rows."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        x, y = collate(examples, rows[i : i + batch_size], layout, block)
        y = y.to(device)
        with autocast(device, dtype):
            logits = call(fwd, to_device(x, device))
        n = int((y != IGNORE_INDEX).sum())
        total += token_loss(logits, y).item() * n
        count += n
    model.train()
    return total / max(count, 1)


def _val_rows(examples: Examples, block: int, layout: Layout, max_rows: int) -> list[list[int]]:
    """Held-out rows in a fixed order: packed in file order, or one example per row."""
    order = np.arange(len(examples))
    if layout == "packed":
        return best_fit(examples.slots, order, block)[:max_rows]
    return [[i] for i in order.tolist()[:max_rows]]


def _eval_examples(cfg: SFTConfig) -> list[TaskExample]:
    return limit_per_task(make_splits(cfg.tasks)["val"], cfg.eval_prompts)
