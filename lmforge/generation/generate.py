"""Batched autoregressive generation with or without the KV cache.

Prompts of different lengths are left-padded; each row gets its own positions (so padding
does not shift rotary phases) and an attention mask that hides pad keys. With the cache, the
prompt is encoded once and each new token costs one position; without it the whole sequence
is re-encoded every step. Both paths build the same masks and positions, which is why their
outputs agree token for token.

Shape legend: B batch, P padded prompt length, S sequence so far.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lmforge.config import check, opt
from lmforge.errors import UserError
from lmforge.generation.sampling import sample_next
from lmforge.models.decoder import Decoder
from lmforge.models.encoder_decoder import EncoderDecoder


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    max_new_tokens: int = opt(64, "tokens to generate per prompt (at most)")
    temperature: float = opt(0.0, "softmax temperature; 0 means greedy decoding")
    top_k: int = opt(0, "sample only from the k most likely tokens; 0 disables")
    top_p: float = opt(1.0, "nucleus sampling: smallest token set with this much mass")
    seed: int = opt(0, "seed for sampling")
    use_cache: bool = opt(True, "reuse keys/values of earlier positions (KV cache)")

    def __post_init__(self) -> None:
        check(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        check(self.temperature >= 0, "temperature", "must be >= 0")
        check(self.top_k >= 0, "top_k", "must be >= 0")
        check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")


@torch.no_grad()
def generate(
    model: Decoder,
    prompts: list[list[int]],
    cfg: SamplingConfig,
    *,
    eos_id: int | None,
    pad_id: int = 0,
    on_step: Callable[[torch.Tensor], None] | None = None,
    row_seeds: Sequence[int] | None = None,
) -> list[list[int]]:
    """New token ids for each prompt, stopping after eos (which is not returned).

    `on_step` sees each step's new ids (B,) as they are chosen, for streaming output.
    `row_seeds` (one per prompt) replaces `cfg.seed` with a sampling stream per row, so a
    row's response is the same whichever rows it is batched with (RL rollouts split between
    processes rely on that).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("generate: every prompt needs at least one token")
    device = model.tok_emb.weight.device
    B, P = len(prompts), max(len(p) for p in prompts)
    limit = model.cfg.max_seq_len
    if P + cfg.max_new_tokens - 1 > limit:  # the last new token is never fed back
        raise UserError(
            f"prompt of {P} tokens + max_new_tokens={cfg.max_new_tokens} exceeds the model's "
            f"context of {limit} tokens"
        )
    idx = torch.full((B, P), pad_id, dtype=torch.long, device=device)
    valid = torch.zeros((B, P), dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        idx[i, P - len(p) :] = torch.tensor(p, device=device)
        valid[i, P - len(p) :] = True
    padded = not bool(valid.all())
    gen = _generators(device, cfg.seed, row_seeds, B)
    was_training = model.training
    model.eval()

    cache = model.new_cache(B, P + cfg.max_new_tokens) if cfg.use_cache else None
    seq, keys_valid = idx, valid
    out = torch.full((B, cfg.max_new_tokens), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    n = 0
    for n in range(cfg.max_new_tokens):
        if cache is None or n == 0:
            x = seq
            positions, mask = _prefill_layout(keys_valid) if padded else (None, None)
        else:
            x = seq[:, -1:]
            positions = (keys_valid.sum(dim=1, keepdim=True) - 1) if padded else None
            mask = keys_valid[:, None, None, :] if padded else None  # (B, 1, 1, S)
        logits = model(x, positions=positions, mask=mask, cache=cache)[:, -1]  # (B, V)
        nxt = _next_tokens(logits, cfg, gen, done, pad_id, eos_id)
        out[:, n] = nxt
        if on_step is not None:
            on_step(nxt)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        keys_valid = torch.cat([keys_valid, torch.ones_like(done)[:, None]], dim=1)
        if bool(done.all()):
            break
    model.train(was_training)
    return _cut_at_eos(out[:, : n + 1], eos_id)


@torch.no_grad()
def generate_seq2seq(
    model: EncoderDecoder,
    sources: list[list[int]],
    cfg: SamplingConfig,
    *,
    start_id: int,
    eos_id: int | None,
    pad_id: int = 0,
    on_step: Callable[[torch.Tensor], None] | None = None,
    vocab_size: int | None = None,
) -> list[list[int]]:
    """Output ids for each input of an encoder-decoder, stopping after eos (not returned).

    Inputs are right-padded and their padding hidden from cross-attention; the encoder runs
    once, and each layer's cross-attention keys/values are computed once per input. With
    `vocab_size`, ids from it up are never drawn: span corruption's sentinels sit past the
    tokenizer's vocabulary, and text meant to be decoded must not contain them.
    """
    if not sources or any(len(s) == 0 for s in sources):
        raise UserError("generate: every input needs at least one token")
    device = model.tok_emb.weight.device
    B, S = len(sources), max(len(s) for s in sources)
    limit = model.cfg.max_seq_len
    if limit < S or cfg.max_new_tokens > limit:
        raise UserError(
            f"input of {S} tokens or max_new_tokens={cfg.max_new_tokens} exceeds the model's "
            f"context of {limit} tokens"
        )
    src = torch.full((B, S), pad_id, dtype=torch.long, device=device)
    valid = torch.zeros((B, S), dtype=torch.bool, device=device)
    for i, s in enumerate(sources):
        src[i, : len(s)] = torch.tensor(s, device=device)
        valid[i, : len(s)] = True
    src_mask = None if bool(valid.all()) else valid[:, None, None, :]  # (B, 1, 1, S)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    was_training = model.training
    model.eval()

    memory_kv = model.memory_kv(model.encode(src, src_mask))
    cache = model.new_cache(B, cfg.max_new_tokens) if cfg.use_cache else None
    tgt = torch.full((B, 1), start_id, dtype=torch.long, device=device)
    out = torch.full((B, cfg.max_new_tokens), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    n = 0
    for n in range(cfg.max_new_tokens):
        x = tgt if cache is None or n == 0 else tgt[:, -1:]
        logits = model.decode(x, memory_kv, memory_mask=src_mask, cache=cache)[:, -1]
        if vocab_size is not None:
            logits[:, vocab_size:] = float("-inf")
        nxt = _next_tokens(logits, cfg, gen, done, pad_id, eos_id)
        out[:, n] = nxt
        if on_step is not None:
            on_step(nxt)
        tgt = torch.cat([tgt, nxt[:, None]], dim=1)
        if bool(done.all()):
            break
    model.train(was_training)
    return _cut_at_eos(out[:, : n + 1], eos_id)


def _generators(
    device: torch.device, seed: int, row_seeds: Sequence[int] | None, B: int
) -> torch.Generator | list[torch.Generator]:
    if row_seeds is None:
        return torch.Generator(device=device).manual_seed(seed)
    if len(row_seeds) != B:
        raise ValueError(f"row_seeds: {len(row_seeds)} seeds for {B} prompts")
    return [torch.Generator(device=device).manual_seed(s) for s in row_seeds]


def _next_tokens(
    logits: torch.Tensor,
    cfg: SamplingConfig,
    gen: torch.Generator | list[torch.Generator],
    done: torch.Tensor,
    pad_id: int,
    eos_id: int | None,
) -> torch.Tensor:
    """Sample the next ids (B,) from logits (B, V); finished rows get pad. Marks rows that just
    emitted eos in `done` (in place)."""
    nxt = sample_next(
        logits, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, generator=gen
    )
    nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
    if eos_id is not None:
        done |= nxt == eos_id
    return nxt


def _cut_at_eos(out: torch.Tensor, eos_id: int | None) -> list[list[int]]:
    results = []
    for row in out.tolist():
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id)]
        results.append(row)
    return results


def _prefill_layout(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (B, S) and mask (B, 1, S, S) for a left-padded batch: causal, pad keys hidden.

    Pad queries attend to themselves so no softmax row is empty (an empty row gives NaN, and a
    NaN value times a zero weight would still poison real rows in the next layer).
    """
    S = valid.size(1)
    positions = (valid.long().cumsum(dim=1) - 1).clamp_min(0)
    causal = torch.ones(S, S, dtype=torch.bool, device=valid.device).tril()
    mask = causal[None] & valid[:, None, :]  # (B, S, S)
    mask |= torch.eye(S, dtype=torch.bool, device=valid.device)[None]
    return positions, mask[:, None]
