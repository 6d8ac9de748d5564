"""Span corruption for encoder-decoder pretraining, as pure tensor functions.

Follows T5 (Raffel et al., 2020, "Exploring the Limits of Transfer Learning with a Unified
Text-to-Text Transformer", sec. 3.1.4, and `random_spans_noise_mask` in its code): a share
`noise_density` of each raw block is dropped in spans of mean length `mean_span_length`. The
input keeps the other tokens and puts one sentinel where each span was; the target lists, span
by span, that span's sentinel and then its tokens. Both end with eos:

    raw     a b c d e f g h            (noise spans: "c d" and "g h")
    input   a b <s0> e f <s1> eos
    target  <s0> c d <s1> g h eos

Key choices:
- Every row of a block of L tokens has the same number of noise tokens and spans
  (`span_counts`), hence the same input and target lengths (`lengths_for`): a batch needs no
  padding, so there is no IGNORE_INDEX here; every target position is a label. Choose L with
  `raw_length_for(input_len)` so the corrupted input fills the encoder (T5's
  `compute_input_and_target_lengths`: a 512-token input takes 568 raw tokens).
- Span placement as T5: the noise tokens are split into n_spans non-empty spans and the other
  tokens into n_spans non-empty runs, each a uniform random composition (a uniform subset of
  the cut points), then laid out run, span, run, span, ... A block therefore starts with kept
  tokens and ends with a noise span. Unlike T5, n_spans is capped at the number of kept tokens
  so that every run is non-empty even at high density with short spans.
- Sentinel k is `first_sentinel + k` (T5 counts down from the top of its vocabulary; counting
  up keeps the ids beyond a tokenizer's vocabulary, which the model's embedding must cover).
  Raw ids must not be sentinels; raw eos tokens (document separators in packed blocks) are fine.
- Deterministic given the generator, as `masking.py`: random numbers are drawn on the
  generator's device and moved to `ids.device`, so a CPU generator gives the same spans for CPU
  and GPU batches. Each call draws two tensors whose shapes depend only on (B, L) and the
  config. No Python loop over tokens and no host sync: positions are scattered, not gathered
  by boolean masks.

Shape legend: B batch, L raw block length, K n_spans, I input length, T target length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmforge.config import check, opt


@dataclass(frozen=True, kw_only=True)
class SpanConfig:
    noise_density: float = opt(0.15, "share of tokens dropped from the input into the target")
    mean_span_length: float = opt(3.0, "mean length of a dropped span")

    def __post_init__(self) -> None:
        check(
            0 < self.noise_density < 1,
            "noise_density",
            f"must be in (0, 1) (got {self.noise_density})",
        )
        check(
            self.mean_span_length >= 1,
            "mean_span_length",
            f"must be >= 1 (got {self.mean_span_length})",
        )


def span_counts(length: int, cfg: SpanConfig) -> tuple[int, int]:
    """(n_noise_tokens, n_spans) for a block of `length` >= 2 tokens, as T5.

    n_noise = round(length * noise_density) clamped to [1, length - 1]; n_spans =
    round(n_noise / mean_span_length), at least 1 and at most length - n_noise, so that each
    noise span has a non-empty run of kept tokens before it. `round` is Python's (ties to even),
    as T5's `np.round`. Since mean_span_length >= 1, n_spans <= n_noise as well.
    """
    if length < 2:
        raise ValueError(f"span corruption needs blocks of at least 2 tokens (got {length})")
    n_noise = min(max(round(length * cfg.noise_density), 1), length - 1)
    n_spans = min(max(round(n_noise / cfg.mean_span_length), 1), length - n_noise)
    return n_noise, n_spans


def lengths_for(raw_length: int, cfg: SpanConfig) -> tuple[int, int]:
    """(input_len, target_len) after corrupting `raw_length` tokens: the input holds the kept
    tokens, one sentinel per span and eos; the target the noise tokens, one sentinel per span
    and eos."""
    n_noise, n_spans = span_counts(raw_length, cfg)
    return raw_length - n_noise + n_spans + 1, n_noise + n_spans + 1


def raw_length_for(input_len: int, cfg: SpanConfig) -> int:
    """The largest raw block length whose corrupted input fits in `input_len` tokens.

    The input length never decreases as the raw length grows (n_noise grows by at most one per
    raw token), so the answer is found by doubling then bisecting; any longer block overflows.
    """
    smallest = lengths_for(2, cfg)[0]
    if input_len < smallest:
        raise ValueError(f"input_len must be >= {smallest} (got {input_len})")
    lo, hi = 2, 4  # lengths_for(lo) fits; find hi that does not
    while lengths_for(hi, cfg)[0] <= input_len:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if lengths_for(mid, cfg)[0] <= input_len:
            lo = mid
        else:
            hi = mid
    return lo


def _random_segment_lengths(
    n_items: int, n_segments: int, B: int, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """(B, n_segments) int64: each row a uniform random composition of n_items into n_segments
    positive parts (T5's `_random_segmentation`): choose n_segments - 1 of the n_items - 1 gaps
    between items as cut points, by taking the smallest of i.i.d. uniform draws."""
    draw = torch.rand((B, n_items - 1), generator=generator, device=generator.device).to(device)
    cuts = draw.argsort(dim=1)[:, : n_segments - 1].sort(dim=1).values + 1  # (B, K-1) in [1, n)
    first = torch.zeros((B, 1), dtype=torch.long, device=device)
    last = torch.full((B, 1), n_items, dtype=torch.long, device=device)
    return torch.cat([first, cuts, last], dim=1).diff(dim=1)  # (B, K)


def _keep(values: torch.Tensor, keep: torch.Tensor, width: int) -> torch.Tensor:
    """values[keep] as (B, width), given that every row keeps exactly `width` positions.

    Scatters instead of boolean indexing, which would need a host sync on a GPU: kept positions
    go to their rank in the row, the others to a spare last column that is cut off."""
    B = values.shape[0]
    dest = torch.where(keep, keep.long().cumsum(dim=1) - 1, width)  # (B, L)
    out = values.new_zeros((B, width + 1)).scatter_(1, dest, values)
    return out[:, :width]


def corrupt_spans(
    ids: torch.Tensor,
    cfg: SpanConfig,
    *,
    first_sentinel: int,
    n_sentinels: int,
    eos_id: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt a batch of raw blocks for span-corruption pretraining.

    ids (B, L) int64, each row a raw block (no ids in [first_sentinel, first_sentinel +
    n_sentinels)). Returns (inputs (B, I), targets (B, T)) with (I, T) = `lengths_for(L)`:
    the k-th noise span of a row is replaced in the input by sentinel `first_sentinel + k`, and
    the target is, for each span in order, its sentinel and then its tokens; both end with eos.
    """
    if ids.dim() != 2:
        raise ValueError(f"ids must be (B, L), got shape {tuple(ids.shape)}")
    B, L = ids.shape
    n_noise, n_spans = span_counts(L, cfg)
    if n_sentinels < n_spans:
        raise ValueError(
            f"blocks of {L} tokens have {n_spans} noise spans but only {n_sentinels} sentinels "
            f"exist; use more sentinels, shorter blocks or a larger mean_span_length"
        )
    input_len, target_len = lengths_for(L, cfg)
    dev = ids.device

    # Lengths of the kept runs and noise spans, interleaved run, span, run, span, ... (B, 2K).
    kept = _random_segment_lengths(L - n_noise, n_spans, B, generator, dev)
    noise = _random_segment_lengths(n_noise, n_spans, B, generator, dev)
    lengths = torch.stack([kept, noise], dim=2).view(B, 2 * n_spans)
    # Mark where each of the 2K segments starts and number every token by its segment.
    starts = lengths.cumsum(dim=1)[:, :-1]  # (B, 2K-1), distinct, in [1, L)
    is_start = torch.zeros((B, L), dtype=torch.bool, device=dev)
    is_start[:, 0] = True
    is_start.scatter_(1, starts, True)
    segment = is_start.long().cumsum(dim=1) - 1  # (B, L) in [0, 2K)
    is_noise = segment % 2 == 1  # (B, L)
    sentinel = first_sentinel + segment // 2  # (B, L): run k and span k share sentinel k
    sentinel = sentinel.to(ids.dtype)

    # Input: kept tokens, and each noise span collapsed to its sentinel at its first position.
    # Target: noise tokens, and each kept run collapsed to the sentinel of the span after it.
    inputs = _keep(torch.where(is_noise, sentinel, ids), ~is_noise | is_start, input_len - 1)
    targets = _keep(torch.where(is_noise, ids, sentinel), is_noise | is_start, target_len - 1)
    eos = torch.full((B, 1), eos_id, dtype=ids.dtype, device=dev)
    return torch.cat([inputs, eos], dim=1), torch.cat([targets, eos], dim=1)


def reconstruct(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    first_sentinel: int,
    n_sentinels: int,
    eos_id: int,
) -> list[list[int]]:
    """Undo `corrupt_spans` exactly: the raw blocks, one list of ids per row.

    A plain per-row loop, for tests and for showing examples. Raises ValueError when a row is
    not a well-formed corruption (missing final eos, sentinels out of order or unmatched).
    """
    rows: list[list[int]] = []
    for b, (inp, tgt) in enumerate(zip(inputs.tolist(), targets.tolist(), strict=True)):
        if not inp or not tgt or inp[-1] != eos_id or tgt[-1] != eos_id:
            raise ValueError(f"row {b}: inputs and targets must end with eos ({eos_id})")

        def is_sentinel(i: int) -> bool:
            return first_sentinel <= i < first_sentinel + n_sentinels

        spans: list[list[int]] = []  # spans[k]: the tokens after sentinel k in the target
        for i in tgt[:-1]:
            if is_sentinel(i):
                if i != first_sentinel + len(spans):
                    raise ValueError(f"row {b}: target sentinel {i} out of order")
                spans.append([])
            elif not spans:
                raise ValueError(f"row {b}: target must start with a sentinel")
            else:
                spans[-1].append(i)
        row: list[int] = []
        n_seen = 0
        for i in inp[:-1]:
            if not is_sentinel(i):
                row.append(i)
                continue
            if i != first_sentinel + n_seen or n_seen >= len(spans):
                raise ValueError(f"row {b}: input sentinel {i} out of order or unmatched")
            row.extend(spans[n_seen])
            n_seen += 1
        if n_seen != len(spans):
            raise ValueError(f"row {b}: {len(spans)} spans in the target, {n_seen} in the input")
        rows.append(row)
    return rows
