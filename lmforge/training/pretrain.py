"""Pretraining: next-token prediction on packed blocks of a tokenized corpus.

`pretrain(cfg, out)` reads and validates the corpus, trains (or reuses) a tokenizer, tokenizes
into cached shards, then runs a plain loop: batch -> forward -> loss -> backward -> clip ->
step -> schedule -> log -> eval -> checkpoint. Every piece of state a step depends on (weights,
AdamW moments, RNG, the data position, which is a pure function of the step) is in the
checkpoint, so a killed run resumed with `resume=True` reproduces the same losses bit for bit
on CPU.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm import tqdm

from lmforge import distributed
from lmforge.config import check, opt, to_dict
from lmforge.data.corpora import Corpus, DataConfig, load_corpus
from lmforge.data.masking import MaskingConfig, mask_tokens
from lmforge.data.packing import BlockSampler, eval_blocks
from lmforge.data.shards import build_shards, cache_root
from lmforge.data.spans import SpanConfig, corrupt_spans, raw_length_for, span_counts
from lmforge.errors import UserError
from lmforge.evaluation.perplexity import (
    BatchTransform,
    held_out_metrics,
    unigram_accuracy,
    unigram_loss,
)
from lmforge.io import atomic_dir
from lmforge.models import FAMILIES, Model
from lmforge.models.transformer import TransformerConfig
from lmforge.objectives.lm import token_loss
from lmforge.runtime import DTYPES, seed_everything
from lmforge.tokenizers import (
    SPECIAL_TOKENS,
    Tokenizer,
    check_vocab_size,
    load_tokenizer,
    train_tokenizer,
)
from lmforge.tokenizers.config import TokenizerConfig
from lmforge.training.checkpoint import load_state
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
from lmforge.training.metrics import (
    CPU_BF16_PEAK_FLOPS,
    decoder_flops_per_token,
)
from lmforge.training.optim import OptimConfig, build_optimizer, lr_at, set_lr
from lmforge.training.preempt import on_sigterm
from lmforge.training.rundir import (
    check_resume_config,
    check_run_dir,
    final_row,
    load_resume_config,
    open_run_files,
    run_dir,
)
from lmforge.training.trackers import check_trackers

# Each family's objectives, its default first. The loop never branches on the family: it asks
# OBJECTIVES for a batch transform and FAMILIES (models/__init__.py) for the model class.
FAMILY_OBJECTIVES = {
    "decoder": ("next_token",),
    "encoder": ("masked_lm",),
    "encoder-decoder": ("span_corruption",),
}


@dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    arch: Literal["decoder", "encoder", "encoder-decoder"] = opt(
        "decoder", "model family: decoder (GPT-style), encoder (BERT-style), encoder-decoder (T5)"
    )
    objective: Literal["auto", "next_token", "masked_lm", "span_corruption"] = opt(
        "auto",
        "training objective; auto: the family's own (next_token, masked_lm, span_corruption)",
    )
    data: DataConfig = opt(DataConfig(), "training text")
    tokenizer: TokenizerConfig = opt(TokenizerConfig(), "tokenizer to train or reuse")
    model: TransformerConfig = opt(TransformerConfig(), "decoder-only transformer")
    optim: OptimConfig = opt(OptimConfig(), "AdamW and learning-rate schedule")
    train: TrainConfig = opt(TrainConfig(), "training loop")
    masking: MaskingConfig = opt(MaskingConfig(), "masked_lm only: which tokens are hidden")
    spans: SpanConfig = opt(SpanConfig(), "span_corruption only: which spans are dropped")

    def __post_init__(self) -> None:
        allowed = FAMILY_OBJECTIVES[self.arch]
        check(
            self.objective in ("auto", *allowed),
            "objective",
            f"{self.objective} does not fit arch={self.arch} (use {' or '.join(allowed)})",
        )
        check(
            self.train.block_size <= self.model.max_seq_len,
            "train.block_size",
            f"{self.train.block_size} exceeds the model's context "
            f"model.max_seq_len={self.model.max_seq_len}",
        )

    @property
    def block_size(self) -> int:
        return self.train.block_size or self.model.max_seq_len

    @property
    def resolved_objective(self) -> str:
        return FAMILY_OBJECTIVES[self.arch][0] if self.objective == "auto" else self.objective

    @property
    def raw_block_size(self) -> int:
        """Tokens the sampler cuts per sample: span corruption shortens its input, so it takes
        the longest raw block whose corrupted input still fits in block_size."""
        if self.resolved_objective == "span_corruption":
            return raw_length_for(self.block_size, self.spans)
        return self.block_size

    @property
    def n_sentinels(self) -> int:
        """Sentinel ids the objective needs past the tokenizer's vocabulary."""
        if self.resolved_objective == "span_corruption":
            return span_counts(self.raw_block_size, self.spans)[1]
        return 0


def next_token_batches(cfg: PretrainConfig, tok: Tokenizer) -> BatchTransform:
    """Inputs and the same block shifted by one: the sampler already cut them that way."""
    return lambda x, y, sample: (x, y)


def masked_lm_batches(cfg: PretrainConfig, tok: Tokenizer) -> BatchTransform:
    """BERT corruption of the input block. The masks of a batch are a pure function of
    (seed, index of its first sample), so a resumed run hides the same tokens."""
    word_start = torch.tensor(tok.word_starts) if cfg.masking.whole_word else None

    def transform(
        x: torch.Tensor, y: torch.Tensor, sample: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed((cfg.train.seed << 50) ^ sample)
        return mask_tokens(
            x,
            cfg.masking,
            mask_id=tok.mask_id,
            n_special=len(SPECIAL_TOKENS),
            vocab_size=tok.vocab_size,
            generator=gen,
            word_start=word_start,
        )

    return transform


def span_corruption_batches(cfg: PretrainConfig, tok: Tokenizer) -> BatchTransform:
    """T5 span corruption of the raw block: the encoder reads the block with spans replaced by
    sentinels, the decoder is teacher-forced on (bos, target[:-1]) to predict the target."""

    def transform(
        x: torch.Tensor, y: torch.Tensor, sample: int
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        gen = torch.Generator().manual_seed((cfg.train.seed << 50) ^ sample)
        inputs, targets = corrupt_spans(
            x,
            cfg.spans,
            first_sentinel=tok.vocab_size,
            n_sentinels=cfg.n_sentinels,
            eos_id=tok.eos_id,
            generator=gen,
        )
        start = torch.full_like(targets[:, :1], tok.bos_id)
        return (inputs, torch.cat([start, targets[:, :-1]], dim=1)), targets

    return transform


OBJECTIVES: dict[str, Callable[[PretrainConfig, Tokenizer], BatchTransform]] = {
    "next_token": next_token_batches,
    "masked_lm": masked_lm_batches,
    "span_corruption": span_corruption_batches,
}


def pretrain(
    cfg: PretrainConfig,
    out: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the pretraining stage into `out`; return the final metrics row.

    With `resume`, `cfg` must equal the run's saved config except for the options in
    `RESUMABLE` (see `resume_config`, which builds it from the saved one).
    """
    state = check_run_dir(out, resume=resume, overwrite=overwrite)
    check_trackers(cfg.train.trackers)
    if state is not None:
        check_resume_config(to_dict(cfg), out)
    if not cfg.tokenizer.path and state is None:
        check_vocab_size(cfg.tokenizer.algo, cfg.tokenizer.vocab_size)  # before reading text
    device, dtype = setup_device(cfg.train, multi_process=True)
    world, rank = distributed.world_size(), distributed.rank()
    share = distributed.batch_share(cfg.train.batch_size, cfg.train.grad_accum, world, rank)
    progress = progress and distributed.is_main()
    corpus = load_corpus(cfg.data)
    with distributed.main_first():
        tokenizer = build_tokenizer(cfg, corpus, out if resume else None, progress)
        data = build_shards(corpus, tokenizer, cfg.data.cache_dir, progress)
    model_cfg = resolve_model_config(cfg.model, tokenizer, cfg.n_sentinels)
    seed_everything(cfg.train.seed)
    model = FAMILIES[cfg.arch](model_cfg).to(device)
    objective = cfg.resolved_objective
    transform = OBJECTIVES[objective](cfg, tokenizer)
    block = cfg.raw_block_size
    sampler = BlockSampler(data.train.tokens, block, cfg.train.seed)
    eval_blocks(data.val.tokens, block, cfg.train.eval_blocks)  # fail now, not at eval
    ddp = distributed.wrap(model, device, cfg.train.dist, dtype)  # the model in one process
    optimizer = build_optimizer(model, cfg.optim)  # after wrap: FSDP replaces the parameters
    fwd = torch.compile(ddp) if cfg.train.compile else ddp
    run_config: dict[str, Any] = {
        "stage": "pretrain",
        "family": cfg.arch,
        "objective": objective,
        "extra_vocab": cfg.n_sentinels,
        "run": to_dict(cfg),
        "model": to_dict(model_cfg),
        "tokenizer_fingerprint": tokenizer.fingerprint,
    }

    guard = StepGuard(cfg.train)
    with run_dir(out, fresh=state is None, overwrite=overwrite), on_sigterm() as sigterm:
        start = 0
        if state is not None:
            saved = load_state(state, model, optimizer)
            start = saved["step"]
            guard.load_state_dict(saved.get("guard"))
            dtype = DTYPES[saved["autocast"]]  # the measured choice stays fixed for exact resume
        metrics = open_run_files(
            out, tokenizer, run_config, start, fresh=state is None, trackers=cfg.train.trackers
        )
        flops_per_token = decoder_flops_per_token(model_cfg, cfg.block_size)
        tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum * block
        if state is None:
            metrics.log(
                {
                    "step": 0,
                    "params": model.num_params(),
                    "unigram_val_loss": unigram_loss(
                        data.train.tokens, data.val.tokens, model_cfg.vocab_size
                    ),
                    "unigram_val_acc": unigram_accuracy(
                        data.train.tokens,
                        data.val,
                        block,
                        cfg.train.batch_size,
                        cfg.train.eval_blocks,
                        transform,
                    ),
                    "tokens_per_byte": data.train.tokens_per_byte,
                    "autocast": str(dtype).removeprefix("torch."),
                }
            )
        print_summary(model, cfg, data.reused, dtype, device, start, progress)
        if start >= cfg.train.max_steps:
            metrics.close()
            distributed.print0(
                f"{out}: already complete at step {start} (raise train.max_steps to extend)"
            )
            return final_row(out)

        save = saver(out, model, optimizer, run_config, dtype, cfg.train, guard)

        bar = step_bar("pretrain", cfg.train.max_steps, start, progress)
        meter = Throughput()
        last: dict[str, Any] = {}
        t_start = time.perf_counter()
        model.train()
        for step in range(start, cfg.train.max_steps):
            lr = lr_at(step, cfg.train.max_steps, cfg.optim)
            set_lr(optimizer, lr, cfg.optim.lr)
            accum = cfg.train.grad_accum
            loss, grad_norm = train_step(
                ddp,
                optimizer,
                (
                    transform(*sampler.batch(first, cfg.train.batch_size), first)
                    for first in ((step * accum + m) * cfg.train.batch_size for m in share.micro)
                ),
                token_loss,
                n_micro=accum,
                device=device,
                dtype=dtype,
                grad_clip=cfg.optim.grad_clip,
                step=step + 1,
                forward=fwd,
                rows=share.rows,
                guard=guard,
            )
            meter.add(tokens_per_step // world)  # this rank's share

            done = step + 1
            bar.update(1)
            row: dict[str, Any] = {}
            if due(done, cfg.train.log_every, cfg.train.max_steps):
                (tps,) = distributed.all_sum(meter.rate())
                row = {
                    "step": done,
                    "loss": loss.item(),
                    "lr": lr,
                    "grad_norm": grad_norm.item(),
                    **guard.counts(),
                    "tokens_per_s": tps,
                    "tokens": done * tokens_per_step,
                    "mfu": tps * flops_per_token / (_peak_flops(device) * world),
                    "elapsed_s": time.perf_counter() - t_start,
                }
                bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{tps:,.0f}")
            t_pause = time.perf_counter()
            if due(done, cfg.train.eval_every, cfg.train.max_steps):
                # every rank evaluates the same blocks, so none waits on rank 0 in the next step
                row.setdefault("step", done)
                row.update(
                    held_out_metrics(
                        model,
                        data.val,
                        block,
                        cfg.train.batch_size,
                        cfg.train.eval_blocks,
                        device,
                        dtype,
                        transform,
                        next_token=objective == "next_token",
                    )
                )
                if progress:
                    bar.write(
                        f"step {done}: val_loss {row['val_loss']:.4f} acc {row['val_acc']:.3f}"
                    )
            if row:
                metrics.log(row)
                last.update(row)
            end_step(done, cfg.train, sigterm, metrics, save)
            meter.exclude(time.perf_counter() - t_pause)
        bar.close()
        metrics.close()
    return last


def build_tokenizer(
    cfg: PretrainConfig, corpus: Corpus, resume_dir: Path | None, progress: bool
) -> Tokenizer:
    """The run's own tokenizer on resume, a given one, or one trained (and cached) on the corpus."""
    if resume_dir is not None:
        return load_tokenizer(resume_dir / "tokenizer")
    tc = cfg.tokenizer
    if tc.path:
        return load_tokenizer(tc.path)
    key = hashlib.sha256(f"{corpus.fingerprint}:{tc.algo}:{tc.vocab_size}".encode()).hexdigest()
    cached = cache_root(cfg.data.cache_dir) / "tokenizers" / key[:24]
    if cached.is_dir():
        try:
            return load_tokenizer(cached)
        except UserError:
            pass  # a damaged cache entry is retrained and replaced, never trusted
    tok = train_tokenizer(tc.algo, corpus.train, tc.vocab_size, show_progress=progress)
    cached.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(cached) as tmp:
        tok.save(tmp)
    return tok


def resolve_model_config(
    model: TransformerConfig, tokenizer: Tokenizer, extra: int = 0
) -> TransformerConfig:
    """The model config with its vocabulary: the tokenizer's plus `extra` sentinel ids."""
    vocab = tokenizer.vocab_size + extra
    if model.vocab_size == 0:
        return dataclasses.replace(model, vocab_size=vocab)
    if model.vocab_size != vocab:
        raise UserError(
            f"model.vocab_size={model.vocab_size} does not match the tokenizer's "
            f"{tokenizer.vocab_size} tokens + {extra} sentinels "
            "(set model.vocab_size=0 to follow the tokenizer)"
        )
    return model


def resume_config(
    out: Path, config_file: Path | None = None, overrides: Sequence[str] = ()
) -> PretrainConfig:
    """The saved config of the run in `out`, with a config file and overrides laid over it."""
    return load_resume_config(PretrainConfig, out, config_file, overrides)


def print_summary(
    model: Model,
    cfg: PretrainConfig,
    reused: bool,
    dtype: torch.dtype,
    device: torch.device,
    start: int,
    progress: bool,
) -> None:
    if not progress:
        return
    n = model.num_params()
    tqdm.write(
        f"model: {n / 1e6:.2f}M parameters ({model.num_params(non_embedding=True) / 1e6:.2f}M "
        f"non-embedding) | {device} {str(dtype).removeprefix('torch.')} | "
        f"tokens: {'cached' if reused else 'tokenized'} | "
        + (f"resuming at step {start}" if start else "starting")
    )


def _peak_flops(device: torch.device) -> float:
    if device.type == "cuda":
        return 989e12  # H100 SXM dense bf16; only a denominator for the MFU figure
    return CPU_BF16_PEAK_FLOPS
