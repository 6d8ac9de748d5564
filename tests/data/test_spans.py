"""T5 span corruption: counts and lengths against T5's own numbers, exact round trips, the layout
of inputs and targets against a plain-loop reference, uniform span placement, determinism and
config validation.

Blocks of distinct ids let a test read the noise mask back from the target (a raw token is
noise exactly when it appears there), so the layout is checked independently of the module's
scatter. Rates are checked within 5 binomial standard errors, as in test_masking.py.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.config import ConfigFieldError, build
from lmforge.data.spans import (
    SpanConfig,
    corrupt_spans,
    lengths_for,
    raw_length_for,
    reconstruct,
    span_counts,
)
from lmforge.errors import UserError

VOCAB, EOS, FIRST_SENTINEL, N_SENTINELS = 1000, 2, 1000, 200
SENTINELS = {"first_sentinel": FIRST_SENTINEL, "n_sentinels": N_SENTINELS, "eos_id": EOS}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def corrupt(ids: torch.Tensor, cfg: SpanConfig, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return corrupt_spans(ids, cfg, generator=gen(seed), **SENTINELS)


def undo(inputs: torch.Tensor, targets: torch.Tensor) -> list[list[int]]:
    return reconstruct(inputs, targets, **SENTINELS)


def distinct_rows(B: int, L: int, seed: int) -> torch.Tensor:
    """(B, L) ids, distinct within each row, drawn from [0, VOCAB) (eos included)."""
    g = gen(seed)
    return torch.stack([torch.randperm(VOCAB, generator=g)[:L] for _ in range(B)])


def runs(mask: list[bool]) -> list[tuple[bool, int]]:
    """(value, length) of each maximal run of equal values, by a plain loop."""
    out: list[tuple[bool, int]] = []
    for m in mask:
        if out and out[-1][0] == m:
            out[-1] = (m, out[-1][1] + 1)
        else:
            out.append((m, 1))
    return out


def reference(row: list[int], noise: list[bool]) -> tuple[list[int], list[int]]:
    """The input and target T5 builds from a row and its noise mask, by a plain loop."""
    inp: list[int] = []
    tgt: list[int] = []
    k = -1
    for t, (i, m) in enumerate(zip(row, noise, strict=True)):
        if m and (t == 0 or not noise[t - 1]):  # a noise span starts
            k += 1
            inp.append(FIRST_SENTINEL + k)
            tgt.append(FIRST_SENTINEL + k)
        (tgt if m else inp).append(i)
    return inp + [EOS], tgt + [EOS]


def within(count: int, n: int, p: float, k: float = 5.0) -> bool:
    return abs(count / n - p) <= k * math.sqrt(p * (1 - p) / n)


# --------------------------------------------------------------------------------------------
# Counts and lengths


def test_counts_and_lengths_match_t5() -> None:
    # T5's span_corruption task: 512-token inputs take 568 raw tokens and give 114-token targets.
    cfg = SpanConfig()
    assert span_counts(512, cfg) == (77, 26)  # round(76.8), round(77 / 3)
    assert span_counts(568, cfg) == (85, 28)
    assert lengths_for(568, cfg) == (568 - 85 + 28 + 1, 85 + 28 + 1) == (512, 114)
    assert raw_length_for(512, cfg) == 568
    assert lengths_for(569, cfg)[0] == 513


def test_counts_at_the_edges() -> None:
    # Two tokens: one noise, one kept, whatever the config.
    assert span_counts(2, SpanConfig(noise_density=0.01)) == (1, 1)
    assert span_counts(2, SpanConfig(noise_density=0.99, mean_span_length=1)) == (1, 1)
    # round(9.5) = 10 is clamped to 9 noise tokens; 9 spans would need 9 kept runs: capped at 1.
    assert span_counts(10, SpanConfig(noise_density=0.95, mean_span_length=1)) == (9, 1)
    # Spans longer than the noise: one span holds it all.
    assert span_counts(100, SpanConfig(mean_span_length=1000)) == (15, 1)
    with pytest.raises(ValueError, match="at least 2"):
        span_counts(1, SpanConfig())


configs = st.builds(
    SpanConfig,
    noise_density=st.floats(0.01, 0.99),
    mean_span_length=st.floats(1.0, 12.0),
)


@settings(max_examples=100, deadline=None)
@given(configs, st.integers(2, 5000))
def test_count_invariants(cfg: SpanConfig, length: int) -> None:
    n_noise, n_spans = span_counts(length, cfg)
    assert 1 <= n_spans <= n_noise <= length - 1
    assert n_spans <= length - n_noise  # a non-empty kept run before every span
    assert n_noise == min(max(round(length * cfg.noise_density), 1), length - 1)
    assert lengths_for(length, cfg) == (length - n_noise + n_spans + 1, n_noise + n_spans + 1)


@settings(max_examples=50, deadline=None)
@given(configs)
def test_input_length_never_decreases_with_the_raw_length(cfg: SpanConfig) -> None:
    # raw_length_for bisects on this.
    lengths = [lengths_for(n, cfg)[0] for n in range(2, 700)]
    assert all(b - a >= 0 for a, b in zip(lengths, lengths[1:], strict=False))


@settings(max_examples=100, deadline=None)
@given(configs, st.integers(0, 3000))
def test_raw_length_for_is_the_largest_that_fits(cfg: SpanConfig, extra: int) -> None:
    input_len = lengths_for(2, cfg)[0] + extra
    raw = raw_length_for(input_len, cfg)
    assert lengths_for(raw, cfg)[0] <= input_len < lengths_for(raw + 1, cfg)[0]
    # Packed blocks waste at most one token of the input: the input grows by at most 2 per
    # raw token (one kept token, one new span).
    assert lengths_for(raw, cfg)[0] >= input_len - 1


def test_raw_length_for_rejects_inputs_too_short_for_any_block() -> None:
    assert raw_length_for(3, SpanConfig()) == 2
    with pytest.raises(ValueError, match=">= 3"):
        raw_length_for(2, SpanConfig())


# --------------------------------------------------------------------------------------------
# Layout and round trips


@st.composite
def cases(draw: st.DrawFn) -> tuple[SpanConfig, int, int, int]:
    return (
        draw(configs),
        draw(st.integers(1, 4)),
        draw(st.integers(2, 300)),
        draw(st.integers(0, 2**31)),
    )


@settings(max_examples=120, deadline=None)
@given(cases())
def test_layout_matches_t5_and_round_trips(case: tuple[SpanConfig, int, int, int]) -> None:
    cfg, B, L, seed = case
    ids = distinct_rows(B, L, seed)
    inputs, targets = corrupt(ids, cfg, seed)
    n_noise, n_spans = span_counts(L, cfg)
    assert (inputs.shape, targets.shape) == tuple((B, n) for n in lengths_for(L, cfg))
    assert inputs.dtype == targets.dtype == torch.int64
    assert undo(inputs, targets) == ids.tolist()

    sentinels = list(range(FIRST_SENTINEL, FIRST_SENTINEL + n_spans))
    for row, inp, tgt in zip(ids.tolist(), inputs.tolist(), targets.tolist(), strict=True):
        dropped = {i for i in tgt[:-1] if i < FIRST_SENTINEL}
        noise = [i in dropped for i in row]
        # Exactly n_noise noise tokens in n_spans spans, kept run first and noise span last.
        assert sum(noise) == n_noise
        r = runs(noise)
        assert [m for m, _ in r] == [False, True] * n_spans
        span_lengths = [n for m, n in r if m]
        assert sum(span_lengths) / len(span_lengths) == n_noise / n_spans
        # The input and target are exactly T5's for that mask.
        assert (inp, tgt) == reference(row, noise)
        # Sentinels: each once, in increasing order, in both; no noise token left in the input.
        assert [i for i in inp if i >= FIRST_SENTINEL] == sentinels
        assert [i for i in tgt if i >= FIRST_SENTINEL] == sentinels
        assert not dropped & set(inp[:-1])
        assert inp[-1] == tgt[-1] == EOS


@settings(max_examples=60, deadline=None)
@given(cases())
def test_round_trip_with_repeated_ids_and_raw_eos(case: tuple[SpanConfig, int, int, int]) -> None:
    cfg, B, L, seed = case
    ids = torch.randint(0, 6, (B, L), generator=gen(seed))  # many repeats, eos (2) among them
    assert undo(*corrupt(ids, cfg, seed + 1)) == ids.tolist()


def test_two_token_block_has_one_outcome() -> None:
    ids = torch.tensor([[10, 11]])
    for seed in range(5):
        inputs, targets = corrupt(ids, SpanConfig(), seed)
        assert inputs.tolist() == [[10, FIRST_SENTINEL, EOS]]
        assert targets.tolist() == [[FIRST_SENTINEL, 11, EOS]]


def test_span_placement_is_uniform() -> None:
    # L=10, density 0.4, mean 2: 4 noise tokens in 2 spans (3 compositions: (1,3), (2,2), (3,1))
    # and 6 kept tokens in 2 runs (5 compositions), each composition equally likely.
    cfg = SpanConfig(noise_density=0.4, mean_span_length=2.0)
    assert span_counts(10, cfg) == (4, 2)
    B = 3000
    inputs, targets = corrupt(torch.arange(10).repeat(B, 1) + 100, cfg, seed=3)
    first_run = (inputs == FIRST_SENTINEL).long().argmax(dim=1)  # kept tokens before <s0>
    first_span = (targets == FIRST_SENTINEL + 1).long().argmax(dim=1) - 1  # tokens of span 0
    for n in range(1, 6):
        assert within(int((first_run == n).sum()), B, 1 / 5)
    for n in range(1, 4):
        assert within(int((first_span == n).sum()), B, 1 / 3)
    # Runs and spans are drawn independently: P(first run 1, first span 1) = 1/15.
    assert within(int(((first_run == 1) & (first_span == 1)).sum()), B, 1 / 15)


def test_rows_get_their_own_spans() -> None:
    inputs, _ = corrupt(torch.arange(128).repeat(8, 1) + 100, SpanConfig())
    assert len({tuple(r) for r in inputs.tolist()}) == 8


# --------------------------------------------------------------------------------------------
# Determinism and errors


def test_same_seed_same_output_other_seed_different() -> None:
    ids = distinct_rows(4, 128, seed=0)
    a, b, c = (
        corrupt(ids, SpanConfig(), 7),
        corrupt(ids, SpanConfig(), 7),
        corrupt(ids, SpanConfig(), 8),
    )
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])


def test_too_few_sentinels() -> None:
    ids = distinct_rows(2, 100, seed=0)  # 15 noise tokens in 5 spans
    with pytest.raises(ValueError, match=r"5 noise spans but only 4 sentinels"):
        corrupt_spans(
            ids, SpanConfig(), first_sentinel=1000, n_sentinels=4, eos_id=EOS, generator=gen(0)
        )
    corrupt_spans(
        ids, SpanConfig(), first_sentinel=1000, n_sentinels=5, eos_id=EOS, generator=gen(0)
    )


def test_bad_shapes_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        corrupt(torch.arange(10), SpanConfig())
    with pytest.raises(ValueError, match="at least 2"):
        corrupt(torch.zeros((3, 1), dtype=torch.long), SpanConfig())


def test_reconstruct_rejects_malformed_rows() -> None:
    s0, s1 = FIRST_SENTINEL, FIRST_SENTINEL + 1
    inp, tgt = torch.tensor([[5, s0, 6, s1, EOS]]), torch.tensor([[s0, 7, s1, 8, EOS]])
    assert undo(inp, tgt) == [[5, 7, 6, 8]]
    with pytest.raises(ValueError, match="end with eos"):
        undo(inp[:, :-1], tgt)
    with pytest.raises(ValueError, match="out of order"):
        undo(torch.tensor([[5, s1, 6, s0, EOS]]), tgt)
    with pytest.raises(ValueError, match="out of order"):
        undo(inp, torch.tensor([[s1, 7, s0, 8, EOS]]))
    with pytest.raises(ValueError, match="start with a sentinel"):
        undo(inp, torch.tensor([[7, s0, s1, 8, EOS]]))
    with pytest.raises(ValueError, match="2 spans in the target, 1 in the input"):
        undo(torch.tensor([[5, s0, 6, EOS]]), tgt)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_batch_matches_cpu_with_a_cpu_generator() -> None:
    ids = distinct_rows(4, 256, seed=1)
    cpu = corrupt(ids, SpanConfig(), seed=5)
    gpu = corrupt(ids.cuda(), SpanConfig(), seed=5)
    assert (
        gpu[0].is_cuda and torch.equal(gpu[0].cpu(), cpu[0]) and torch.equal(gpu[1].cpu(), cpu[1])
    )


# --------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"noise_density": 0.0}, "noise_density"),
        ({"noise_density": 1.0}, "noise_density"),
        ({"noise_density": float("nan")}, "noise_density"),
        ({"mean_span_length": 0.99}, "mean_span_length"),
        ({"mean_span_length": float("nan")}, "mean_span_length"),
    ],
)
def test_config_validation(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigFieldError) as e:
        SpanConfig(**kwargs)
    assert e.value.field == field


def test_config_loads_with_field_names() -> None:
    assert build(SpanConfig, {"noise_density": 0.5, "mean_span_length": 1}).mean_span_length == 1.0
    with pytest.raises(UserError, match="run.toml: field 'noise_density'"):
        build(SpanConfig, {"noise_density": 1.5}, "run.toml")
