"""Batched autoregressive generation with or without the KV cache.

Prompts of different lengths are left-padded; each row gets its own positions (so padding
does not shift rotary phases) and an attention mask that hides pad keys. With the cache, the
prompt is encoded once and each new token costs one position; without it the whole sequence
is re-encoded every step. Both paths build the same masks and positions, which is why their
outputs agree token for token.

Speed (decoding is per-op overhead and cache reads at small sizes): the sequence is allocated
once and written in place, only the last position goes through the LM head, and rows are
sorted by prompt length into the cache's row groups (kv_cache.py), so that the padding of short
prompts beside a long one is neither prefilled nor read by each step's attention.

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
from lmforge.models.kv_cache import KVCache, RowGroup
from lmforge.tokenizers import Tokenizer


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
    if row_seeds is not None and len(row_seeds) != B:
        raise ValueError(f"row_seeds: {len(row_seeds)} seeds for {B} prompts")
    # Rows sorted by prompt length, so that rows with similar padding sit together (the KV
    # cache's row groups); `order[j]` is the prompt in row j, undone on the way out.
    order = sorted(range(B), key=lambda i: len(prompts[i]))
    # Every position the call will hold, prompt then new tokens, allocated once: new tokens
    # are written in place, and each step reads a slice (no concatenation per step).
    total = P + cfg.max_new_tokens
    seq = torch.full((B, total), pad_id, dtype=torch.long, device=device)
    valid = torch.ones((B, total), dtype=torch.bool, device=device)  # False on left padding
    for j, i in enumerate(order):
        seq[j, P - len(prompts[i]) : P] = torch.tensor(prompts[i], device=device)
        valid[j, : P - len(prompts[i])] = False
    padded = not bool(valid[:, :P].all())
    lengths = valid[:, :P].sum(dim=1, keepdim=True)  # (B, 1) real prompt tokens
    seeds = None if row_seeds is None else [row_seeds[i] for i in order]
    gen = _generators(device, cfg.seed, seeds)
    unsort = torch.tensor(sorted(range(B), key=lambda j: order[j]), device=device)
    was_training = model.training
    model.eval()

    # Decode steps on a CPU hide pad keys by adding -inf: SDPA would turn a boolean mask into
    # that at every layer and step (~6% of a batch-16 call's CPU time in the profile).
    decode_mask = valid
    if padded and device.type == "cpu":
        decode_mask = torch.zeros(B, total, device=device).masked_fill_(~valid, float("-inf"))
    cache = None
    if cfg.use_cache:
        cache = model.new_cache(B, total)
        if padded and device.type == "cpu":  # costs measured on CPUs; a GPU keeps one group
            # bytes of keys and values per position and layer, in fp32 as attention reads them
            position_bytes = 2 * model.cfg.kv_heads * model.cfg.head_size * 4
            group_cost = GROUP_COST_BYTES // position_bytes
            cache.groups = row_groups([len(prompts[i]) for i in order], P, group_cost)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    n = 0
    for n in range(cfg.max_new_tokens):
        S = P + n  # tokens so far
        if cache is not None and n == 0:
            hidden = _prefill(model, seq[:, :P], valid[:, :P], cache)
        else:
            if cache is None:
                x = seq[:, :S]
                positions, mask = _prefill_layout(valid[:, :S]) if padded else (None, None)
            else:
                x = seq[:, S - 1 : S]
                positions = lengths + (n - 1) if padded else None  # (B, 1)
                mask = decode_mask[:, None, None, :S] if padded else None  # (B, 1, 1, S)
            hidden = model.hidden_states(x, positions=positions, mask=mask, cache=cache)[:, -1]
        logits = model.lm_head(hidden)  # (B, V): only the last position is sampled
        nxt = _next_tokens(logits, cfg, gen, done, pad_id, eos_id)
        seq[:, S] = nxt
        if on_step is not None:
            on_step(nxt[unsort])
        if eos_id is not None and bool(done.all()):
            break
    model.train(was_training)
    rows = _cut_at_eos(seq[:, P : P + n + 1], eos_id)
    return [rows[j] for j in unsort.tolist()]


def _prefill(
    model: Decoder, seq: torch.Tensor, valid: torch.Tensor, cache: KVCache
) -> torch.Tensor:
    """Encode the prompts seq (B, P) into the cache; the last position's hidden state (B, D).

    Each row group of the cache is encoded on its own, from its first non-padding position, so
    the padding of short prompts beside a long one costs no compute."""
    P = seq.size(1)
    if cache.groups == [(0, seq.size(0), 0)] and bool(valid.all()):
        return model.hidden_states(seq, cache=cache)[:, -1]
    last = []
    for first, end, start in cache.groups:
        positions, mask = _prefill_layout(valid[first:end, start:])
        part = cache.rows(first, end, start)
        x = seq[first:end, start:]
        last.append(model.hidden_states(x, positions=positions, mask=mask, cache=part)[:, -1])
    cache.advance(P)
    return torch.cat(last)


# What a row group costs beyond its reads, as bytes of keys/values read: its slices and
# attention call per layer and step, while the CPU reads the cache at ~8 GB/s. On the sampling
# benchmark's prompts (batch 16, 9..65 tokens; 312 real tokens of 1,040 padded) both benchmark
# shapes then split into 2 groups, and whole sampling calls measured 1.1-1.2x faster than with
# one group (3 groups were no faster).
GROUP_COST_BYTES = 320_000


def row_groups(lengths: list[int], P: int, group_cost: int) -> list[RowGroup]:
    """Contiguous groups of rows, prompt `lengths` ascending and right-aligned at P, that
    minimise the positions attention reads (rows x longest prompt, per group) + `group_cost`
    positions per group."""
    B = len(lengths)
    # A group only ever needs to end where the length changes (or at the last row).
    ends = [0] + [i for i in range(1, B) if lengths[i] != lengths[i - 1]] + [B]
    cost = [0] * len(ends)
    prev = [0] * len(ends)
    for j in range(1, len(ends)):
        options = [
            (cost[i] + (ends[j] - ends[i]) * lengths[ends[j] - 1] + group_cost, i) for i in range(j)
        ]
        cost[j], prev[j] = min(options)
    groups = []
    j = len(ends) - 1
    while j > 0:
        i = prev[j]
        groups.append((ends[i], ends[j], P - lengths[ends[j] - 1]))
        j = i
    return groups[::-1]


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
    # The decoder's input: start id, then each new token written in place as it is chosen.
    tgt = torch.full((B, cfg.max_new_tokens + 1), pad_id, dtype=torch.long, device=device)
    tgt[:, 0] = start_id
    done = torch.zeros(B, dtype=torch.bool, device=device)
    n = 0
    for n in range(cfg.max_new_tokens):
        x = tgt[:, : n + 1] if cache is None or n == 0 else tgt[:, n : n + 1]
        logits = model.decode(x, memory_kv, memory_mask=src_mask, cache=cache)[:, -1]
        if vocab_size is not None:
            logits[:, vocab_size:] = float("-inf")
        nxt = _next_tokens(logits, cfg, gen, done, pad_id, eos_id)
        tgt[:, n + 1] = nxt
        if on_step is not None:
            on_step(nxt)
        if eos_id is not None and bool(done.all()):
            break
    model.train(was_training)
    return _cut_at_eos(tgt[:, 1 : n + 2], eos_id)


def generate_replies(
    model: Decoder | EncoderDecoder,
    prompts: list[list[int]],
    cfg: SamplingConfig,
    tok: Tokenizer,
    *,
    eos_id: int | None,
    on_step: Callable[[torch.Tensor], None] | None = None,
) -> list[list[int]]:
    """New ids for each prompt, as text to decode with `tok`: a decoder continues the prompt,
    an encoder-decoder maps it to an output (never drawing the span-corruption sentinels that
    sit past `tok`'s vocabulary)."""
    if isinstance(model, EncoderDecoder):
        return generate_seq2seq(
            model,
            prompts,
            cfg,
            start_id=tok.bos_id,
            eos_id=eos_id,
            pad_id=tok.pad_id,
            on_step=on_step,
            vocab_size=tok.vocab_size,
        )
    return generate(model, prompts, cfg, eos_id=eos_id, pad_id=tok.pad_id, on_step=on_step)


def _generators(
    device: torch.device, seed: int, row_seeds: Sequence[int] | None
) -> torch.Generator | list[torch.Generator]:
    if row_seeds is None:
        return torch.Generator(device=device).manual_seed(seed)
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
    if eos_id is not None:  # without one no row ever finishes
        nxt = nxt.masked_fill(done, pad_id)
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
