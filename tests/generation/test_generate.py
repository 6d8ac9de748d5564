from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import lmforge.generation.generate as generate_module
from lmforge.errors import UserError
from lmforge.generation.generate import SamplingConfig, generate, row_groups
from lmforge.generation.sampling import draw, sample_next
from lmforge.models.decoder import Decoder
from lmforge.models.transformer import TransformerConfig


@pytest.fixture(scope="module")
def model() -> Decoder:
    torch.manual_seed(1)
    return Decoder(TransformerConfig(vocab_size=40, n_layer=2, n_head=2, n_embd=32, max_seq_len=48))


PROMPTS = [[5, 6, 7, 8, 9], [3], [10, 11, 12]]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cache_and_no_cache_give_identical_tokens(model: Decoder, temperature: float) -> None:
    outs = []
    for use_cache in (True, False):
        cfg = SamplingConfig(
            max_new_tokens=20, temperature=temperature, seed=3, use_cache=use_cache
        )
        outs.append(generate(model, PROMPTS, cfg, eos_id=None))
    assert outs[0] == outs[1]
    assert all(len(o) == 20 for o in outs[0])


def test_batched_equals_one_by_one(model: Decoder) -> None:
    cfg = SamplingConfig(max_new_tokens=12)
    batched = generate(model, PROMPTS, cfg, eos_id=None)
    single = [generate(model, [p], cfg, eos_id=None)[0] for p in PROMPTS]
    assert batched == single


def test_a_row_seed_samples_the_same_response_in_any_batch(model: Decoder) -> None:
    # what lets torchrun ranks split an RL rollout: a row's sample depends on its seed only
    cfg = SamplingConfig(max_new_tokens=12, temperature=1.0)
    seeds = [11, 12, 13]
    batched = generate(model, PROMPTS, cfg, eos_id=None, row_seeds=seeds)
    split = generate(model, PROMPTS[:1], cfg, eos_id=None, row_seeds=seeds[:1])
    split += generate(model, PROMPTS[1:], cfg, eos_id=None, row_seeds=seeds[1:])
    assert batched == split
    twice = generate(model, [PROMPTS[0]] * 2, cfg, eos_id=None, row_seeds=[1, 2])
    assert twice[0] != twice[1]  # one prompt, two seeds: two different samples


def test_stops_at_eos(model: Decoder) -> None:
    cfg = SamplingConfig(max_new_tokens=15)
    free = generate(model, [PROMPTS[0]], cfg, eos_id=None)[0]
    eos = free[4]  # pretend the 5th greedy token is end-of-sequence
    cut = generate(model, [PROMPTS[0]], cfg, eos_id=eos)[0]
    assert cut == free[: free.index(eos)]


def test_context_overflow_is_a_user_error(model: Decoder) -> None:
    # 40 prompt tokens + 9 new ones feed 48 positions: exactly the model's context.
    assert len(generate(model, [[1] * 40], SamplingConfig(max_new_tokens=9), eos_id=None)[0]) == 9
    with pytest.raises(UserError, match="exceeds the model's context"):
        generate(model, [[1] * 41], SamplingConfig(max_new_tokens=9), eos_id=None)


def test_top_k_and_top_p_restrict_support() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    k2 = sample_next(logits, temperature=1.0, top_k=2, generator=g)
    assert set(k2.tolist()) == {0, 1}
    p = sample_next(logits, temperature=1.0, top_p=0.75, generator=g)
    assert set(p.tolist()) == {0, 1}  # 0.5 < 0.75 needs the second token; 0.8 covers it
    assert sample_next(logits[:1]).item() == 0  # greedy


def test_draw_takes_the_first_token_whose_cumulative_mass_reaches_u() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2, 0.0])).repeat(5, 1)  # last token: -inf
    u = torch.tensor([1e-7, 0.5, 0.51, 0.81, 1.0])
    assert draw(logits, u).tolist() == [0, 0, 1, 2, 2]  # u = 1 never reaches the -inf token


def test_sampled_frequencies_follow_the_probabilities() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = (probs.log() + 3.0).repeat(20000, 1)  # a shift does not change softmax
    ids = sample_next(logits, temperature=1.0, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(ids, minlength=4).float() / len(ids)
    torch.testing.assert_close(freq, probs, atol=0.012, rtol=0)
    hot = sample_next(logits[:4000], temperature=0.5, generator=torch.Generator().manual_seed(1))
    sharpened = probs**2 / (probs**2).sum()  # temperature 0.5 squares the probabilities
    freq = torch.bincount(hot, minlength=4).float() / len(hot)
    torch.testing.assert_close(freq, sharpened, atol=0.03, rtol=0)


def test_a_seed_fixes_the_samples(model: Decoder) -> None:
    def run(seed: int) -> list[list[int]]:
        cfg = SamplingConfig(max_new_tokens=10, temperature=1.0, seed=seed)
        return generate(model, PROMPTS, cfg, eos_id=None)

    assert run(4) == run(4)
    assert run(4) != run(5)


def test_row_groups_split_off_long_prompts_when_padding_costs_more() -> None:
    lengths = [2, 2, 3, 30]  # ascending, right-aligned at 30
    assert row_groups(lengths, 30, group_cost=1000) == [(0, 4, 0)]
    assert row_groups(lengths, 30, group_cost=10) == [(0, 3, 27), (3, 4, 0)]
    assert row_groups(lengths, 30, group_cost=0) == [(0, 2, 28), (2, 3, 27), (3, 4, 0)]
    assert row_groups([5, 5, 5], 5, group_cost=0) == [(0, 3, 0)]


UNEVEN = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [3], [10, 11, 12], [4, 4], [7] * 12]


@pytest.mark.parametrize(("temperature", "n_kv_head"), [(0.0, 0), (1.0, 0), (0.0, 1)])
def test_row_groups_decode_as_the_uncached_batch(
    temperature: float, n_kv_head: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(1)
    shape = dict(n_layer=2, n_head=2, n_kv_head=n_kv_head, n_embd=32, max_seq_len=48)
    model = Decoder(TransformerConfig(vocab_size=40, **shape))
    cfg = SamplingConfig(max_new_tokens=16, temperature=temperature, seed=2)
    no_cache = generate(model, UNEVEN, replace(cfg, use_cache=False), eos_id=None)
    one_group = generate(model, UNEVEN, cfg, eos_id=None)
    monkeypatch.setattr(generate_module, "GROUP_COST_BYTES", 0)  # a group per prompt length
    groups = generate(model, UNEVEN, cfg, eos_id=None)
    assert groups == one_group == no_cache


def test_on_step_sees_the_rows_in_prompt_order(model: Decoder) -> None:
    steps: list[list[int]] = []
    cfg = SamplingConfig(max_new_tokens=6)
    out = generate(model, UNEVEN, cfg, eos_id=None, on_step=lambda ids: steps.append(ids.tolist()))
    assert [list(row) for row in zip(*steps, strict=True)] == out
