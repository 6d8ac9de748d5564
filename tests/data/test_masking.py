"""BERT-style masked-token corruption: selection rates, the 80/10/10 split, specials, whole
words, determinism and config validation.

Rates are checked on large batches against the binomial: a share counts as right when it lies
within 5 standard errors of the configured probability (a false failure about once in 3.5 million
runs per check). Word boundaries are recomputed here by a plain Python loop, independently of
the module's cumsum.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.config import ConfigFieldError, build
from lmforge.data.masking import IGNORE_INDEX, MaskingConfig, mask_tokens
from lmforge.errors import UserError
from lmforge.objectives.lm import IGNORE_INDEX as LM_IGNORE_INDEX

N_SPECIAL, MASK_ID, VOCAB = 9, 4, 1000


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_batch(
    B: int,
    T: int,
    *,
    vocab: int = VOCAB,
    n_special: int = N_SPECIAL,
    special_share: float = 0.1,
    seed: int = 0,
) -> torch.Tensor:
    """(B, T) ids over [n_special, vocab) with about `special_share` special ids sprinkled in."""
    g = gen(seed)
    ids = torch.randint(n_special, vocab, (B, T), generator=g)
    specials = torch.randint(0, n_special, (B, T), generator=g)
    return torch.where(torch.rand((B, T), generator=g) < special_share, specials, ids)


def within(count: int, n: int, p: float, k: float = 5.0) -> bool:
    """Whether count/n is within k binomial standard errors of p."""
    se = math.sqrt(p * (1 - p) / n)
    return abs(count / n - p) <= k * se


def run(
    ids: torch.Tensor, cfg: MaskingConfig, seed: int = 1, **kw: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    kw = {"mask_id": MASK_ID, "n_special": N_SPECIAL, "vocab_size": VOCAB, **kw}
    return mask_tokens(ids, cfg, generator=gen(seed), **kw)


def reference_words(ids: torch.Tensor, word_start: torch.Tensor, n_special: int) -> list[list[int]]:
    """Flat positions of each word, by a plain loop: a word opens at a word-start token, at the
    first position of a row, or after a special; a special token belongs to no word."""
    B, T = ids.shape
    words: list[list[int]] = []
    for b in range(B):
        current: list[int] | None = None
        for t in range(T):
            i = int(ids[b, t])
            if i < n_special:
                current = None
                continue
            if current is None or bool(word_start[i]):
                current = []
                words.append(current)
            current.append(b * T + t)
    return words


def check_invariants(
    ids: torch.Tensor,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    n_special: int,
    vocab: int,
    mask_id: int,
) -> torch.Tensor:
    """The invariants every call must satisfy; returns the selected (B, T) mask."""
    assert inputs.shape == labels.shape == ids.shape
    assert inputs.dtype == labels.dtype == ids.dtype
    selected = labels != IGNORE_INDEX
    assert torch.equal(labels[selected], ids[selected])  # labels are the original ids
    assert torch.equal(inputs[~selected], ids[~selected])  # the rest is untouched
    assert not selected[ids < n_special].any()  # specials never selected
    changed = selected & (inputs != ids)
    # A changed token is the mask token or a random non-special id, never another special.
    ok = (inputs[changed] == mask_id) | ((inputs[changed] >= n_special) & (inputs[changed] < vocab))
    assert ok.all()
    # At least one selection per batch whenever there is a non-special token.
    assert bool(selected.any()) == bool((ids >= n_special).any())
    return selected


# --------------------------------------------------------------------------------------------
# Rates


@pytest.mark.parametrize(
    ("mask_prob", "r_mask", "r_random"), [(0.15, 0.8, 0.1), (0.3, 0.5, 0.5), (0.5, 0.0, 0.25)]
)
def test_selection_and_replacement_rates(mask_prob: float, r_mask: float, r_random: float) -> None:
    ids = random_batch(64, 512)
    cfg = MaskingConfig(mask_prob=mask_prob, replace_with_mask=r_mask, replace_with_random=r_random)
    inputs, labels = run(ids, cfg)
    selected = check_invariants(
        ids, inputs, labels, n_special=N_SPECIAL, vocab=VOCAB, mask_id=MASK_ID
    )
    n_candidates = int((ids >= N_SPECIAL).sum())
    n_sel = int(selected.sum())
    assert within(n_sel, n_candidates, mask_prob)

    is_mask = selected & (inputs == MASK_ID)
    is_same = selected & (inputs == ids)
    is_random = selected & ~is_mask & ~is_same
    # A random replacement equals the original with probability 1/K; it then reads "unchanged".
    K = VOCAB - N_SPECIAL
    r_keep = 1 - r_mask - r_random
    assert within(int(is_mask.sum()), n_sel, r_mask)
    assert within(int(is_random.sum()), n_sel, r_random * (1 - 1 / K))
    assert within(int(is_same.sum()), n_sel, r_keep + r_random / K)
    assert int(is_mask.sum() + is_random.sum() + is_same.sum()) == n_sel


def test_random_replacements_are_uniform_over_non_special_ids() -> None:
    vocab = 20  # 11 non-special ids, so each gets many draws
    ids = random_batch(64, 512, vocab=vocab)
    cfg = MaskingConfig(mask_prob=0.5, replace_with_mask=0.0, replace_with_random=1.0)
    inputs, labels = run(ids, cfg, vocab_size=vocab)
    selected = check_invariants(
        ids, inputs, labels, n_special=N_SPECIAL, vocab=vocab, mask_id=MASK_ID
    )
    replaced = inputs[selected]  # with replace_with_random=1, every selected token is a draw
    assert int(replaced.min()) >= N_SPECIAL and int(replaced.max()) < vocab
    counts = torch.bincount(replaced, minlength=vocab)
    assert counts[:N_SPECIAL].sum() == 0
    n, K = len(replaced), vocab - N_SPECIAL
    for c in counts[N_SPECIAL:].tolist():
        assert within(c, n, 1 / K)


def test_specials_never_selected_even_when_every_other_token_is() -> None:
    ids = random_batch(16, 256, special_share=0.4)
    cfg = MaskingConfig(mask_prob=0.999, replace_with_mask=0.0, replace_with_random=1.0)
    inputs, labels = run(ids, cfg)
    special = ids < N_SPECIAL
    assert (labels[special] == IGNORE_INDEX).all()
    assert torch.equal(inputs[special], ids[special])
    assert (inputs[~special] >= N_SPECIAL).all()  # random replacements are never specials


def test_ignore_index_matches_the_lm_loss() -> None:
    assert IGNORE_INDEX == LM_IGNORE_INDEX


# --------------------------------------------------------------------------------------------
# At least one selection per batch


def test_at_least_one_selection_per_batch() -> None:
    cfg = MaskingConfig(mask_prob=0.001)
    ids = torch.tensor([[2, 20, 21, 2, 22, 0]])  # 3 candidates: usually none drawn
    for seed in range(50):
        inputs, labels = run(ids, cfg, seed=seed)
        selected = labels != IGNORE_INDEX
        assert int(selected.sum()) == 1
        assert int(ids[selected]) in (20, 21, 22)


def test_fallback_only_when_the_draws_selected_nothing() -> None:
    # Two candidates at mask_prob 0.5: Bernoulli gives 0, 1 or 2 selections with probability
    # 1/4, 1/2, 1/4; the fallback turns the 0 into a 1 and must leave the 2s at 1/4.
    ids = torch.tensor([[20, 21]])
    n_seeds = 800
    counts = [0, 0, 0]
    for seed in range(n_seeds):
        _, labels = run(ids, MaskingConfig(mask_prob=0.5), seed=seed)
        counts[int((labels != IGNORE_INDEX).sum())] += 1
    assert counts[0] == 0
    assert within(counts[2], n_seeds, 0.25)


def test_all_special_batch_has_no_labels() -> None:
    ids = torch.tensor([[0, 2, 1], [4, 8, 0]])
    inputs, labels = run(ids, MaskingConfig())
    assert (labels == IGNORE_INDEX).all()
    assert torch.equal(inputs, ids)


def test_fallback_takes_a_whole_word() -> None:
    word_start = torch.zeros(VOCAB, dtype=torch.bool)
    word_start[:N_SPECIAL] = True
    word_start[100] = True  # 100 starts a word; 500 is a '##' piece
    ids = torch.tensor([[100, 500, 500, 2, 100, 500]])
    cfg = MaskingConfig(mask_prob=0.001, whole_word=True)
    seen = set()
    for seed in range(50):
        _, labels = run(ids, cfg, seed=seed, word_start=word_start)
        sel = tuple((labels[0] != IGNORE_INDEX).tolist())
        assert sel in {
            (True, True, True, False, False, False),
            (False, False, False, False, True, True),
        }
        seen.add(sel)
    assert len(seen) == 2


# --------------------------------------------------------------------------------------------
# Determinism


def test_same_seed_same_output_other_seed_different() -> None:
    ids = random_batch(8, 128)
    for cfg in (MaskingConfig(), MaskingConfig(whole_word=True)):
        ws = torch.rand(VOCAB, generator=gen(5)) < 0.6
        a = run(ids, cfg, seed=7, word_start=ws)
        b = run(ids, cfg, seed=7, word_start=ws)
        c = run(ids, cfg, seed=8, word_start=ws)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert not torch.equal(a[1], c[1])
        assert not torch.equal(a[0], c[0])


def test_draws_do_not_depend_on_the_config() -> None:
    # Every call consumes the same randomness, so the generator ends in the same state.
    ids = random_batch(4, 64)
    states = []
    for cfg in (MaskingConfig(), MaskingConfig(mask_prob=0.5, whole_word=True)):
        g = gen(3)
        mask_tokens(
            ids,
            cfg,
            mask_id=MASK_ID,
            n_special=N_SPECIAL,
            vocab_size=VOCAB,
            generator=g,
            word_start=torch.ones(VOCAB, dtype=torch.bool),
        )
        states.append(g.get_state())
    assert torch.equal(states[0], states[1])


# --------------------------------------------------------------------------------------------
# Whole words


def wordpiece_batch(B: int, T: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids of words of 1-4 tokens (a start in [9, 500), '##' pieces in [500, 1000)), with some
    special tokens dropped in (which cut words), and the matching (V,) word_start."""
    g = gen(seed)
    word_start = torch.zeros(VOCAB, dtype=torch.bool)
    word_start[:500] = True
    rows = []
    for _ in range(B):
        row: list[int] = []
        while len(row) < T:
            n = int(torch.randint(1, 5, (1,), generator=g))
            row.append(int(torch.randint(N_SPECIAL, 500, (1,), generator=g)))
            row.extend(torch.randint(500, VOCAB, (n - 1,), generator=g).tolist())
        rows.append(row[:T])
    ids = torch.tensor(rows)
    specials = torch.randint(0, N_SPECIAL, (B, T), generator=g)
    ids = torch.where(torch.rand((B, T), generator=g) < 0.05, specials, ids)
    return ids, word_start


def test_whole_word_selects_words_all_or_nothing() -> None:
    ids, word_start = wordpiece_batch(64, 256, seed=0)
    cfg = MaskingConfig(whole_word=True)
    inputs, labels = run(ids, cfg, word_start=word_start)
    selected = check_invariants(
        ids, inputs, labels, n_special=N_SPECIAL, vocab=VOCAB, mask_id=MASK_ID
    ).flatten()
    words = reference_words(ids, word_start, N_SPECIAL)
    assert sum(len(w) for w in words) == int((ids >= N_SPECIAL).sum())
    n_words_selected = 0
    for w in words:
        flags = selected[w]
        assert flags.all() or not flags.any(), w
        n_words_selected += bool(flags[0])
    assert within(n_words_selected, len(words), cfg.mask_prob)
    # Multi-token words exist and some are selected, so the check above has teeth.
    assert any(len(w) > 1 and bool(selected[w[0]]) for w in words)


def test_special_tokens_split_words() -> None:
    word_start = torch.zeros(VOCAB, dtype=torch.bool)  # specials not marked: the module must cut
    word_start[100] = True
    # One "word" by word_start alone, cut in two by eos (2): [100, ##, ##] eos [##, ##].
    ids = torch.tensor([[100, 500, 501, 2, 502, 503]]).repeat(256, 1)
    cfg = MaskingConfig(mask_prob=0.5, whole_word=True)
    _, labels = run(ids, cfg, word_start=word_start)
    sel = labels != IGNORE_INDEX
    assert not sel[:, 3].any()
    assert torch.equal(sel[:, 0], sel[:, 1]) and torch.equal(sel[:, 0], sel[:, 2])
    assert torch.equal(sel[:, 4], sel[:, 5])
    assert (sel[:, 0] != sel[:, 4]).any()  # the two halves are drawn independently
    # A row that starts with '##' pieces (a block cut mid-word) starts a word there.
    ids = torch.tensor([[500, 501, 100, 502]]).repeat(256, 1)
    _, labels = run(ids, cfg, word_start=word_start)
    sel = labels != IGNORE_INDEX
    assert torch.equal(sel[:, 0], sel[:, 1]) and torch.equal(sel[:, 2], sel[:, 3])
    assert (sel[:, 0] != sel[:, 2]).any()


def test_whole_word_needs_word_start() -> None:
    with pytest.raises(ValueError, match="word_start"):
        run(random_batch(2, 8), MaskingConfig(whole_word=True))


def test_empty_batch() -> None:
    for shape in ((0, 8), (3, 0)):
        ids = torch.zeros(shape, dtype=torch.long)
        inputs, labels = run(ids, MaskingConfig(whole_word=True), word_start=torch.ones(VOCAB) > 0)
        assert inputs.shape == labels.shape == shape


def test_bad_shapes_and_vocab_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        run(torch.tensor([10, 11]), MaskingConfig())
    with pytest.raises(ValueError, match="n_special"):
        run(random_batch(2, 8), MaskingConfig(), vocab_size=N_SPECIAL)


# --------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"mask_prob": 0.0}, "mask_prob"),
        ({"mask_prob": 1.0}, "mask_prob"),
        ({"replace_with_mask": -0.1}, "replace_with_mask"),
        ({"replace_with_mask": 1.5}, "replace_with_mask"),
        ({"replace_with_random": -0.1}, "replace_with_random"),
        ({"replace_with_mask": 0.8, "replace_with_random": 0.3}, "replace_with_random"),
    ],
)
def test_config_validation(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigFieldError) as e:
        MaskingConfig(**kwargs)
    assert e.value.field == field


def test_config_edges_accepted_and_loaded_with_field_names() -> None:
    MaskingConfig(replace_with_mask=0.7, replace_with_random=0.3)  # sums to 1 in floats
    MaskingConfig(replace_with_mask=0.0, replace_with_random=0.0)
    assert build(MaskingConfig, {"mask_prob": 0.2, "whole_word": True}).whole_word
    with pytest.raises(UserError, match="field 'mask_prob'"):
        build(MaskingConfig, {"mask_prob": 1.5}, "run.toml")


# --------------------------------------------------------------------------------------------
# Properties


@st.composite
def cases(draw: st.DrawFn) -> tuple[Any, ...]:
    n_special = draw(st.integers(1, 9))
    vocab = draw(st.integers(n_special + 1, n_special + 40))
    r_mask = draw(st.floats(0, 1))
    r_random = draw(st.floats(0, 1 - r_mask))
    cfg = MaskingConfig(
        mask_prob=draw(st.floats(0.01, 0.99)),
        replace_with_mask=r_mask,
        replace_with_random=r_random,
        whole_word=draw(st.booleans()),
    )
    shape = (draw(st.integers(1, 4)), draw(st.integers(1, 24)))
    special_share = draw(st.sampled_from([0.0, 0.2, 0.7, 1.0]))
    mask_id = draw(st.integers(0, n_special - 1))
    return cfg, shape, n_special, vocab, special_share, mask_id, draw(st.integers(0, 2**31))


@settings(max_examples=150, deadline=None)
@given(cases())
def test_invariants_hold_for_any_shape_and_rates(case: tuple[Any, ...]) -> None:
    cfg, (B, T), n_special, vocab, special_share, mask_id, seed = case
    ids = random_batch(
        B, T, vocab=vocab, n_special=n_special, special_share=special_share, seed=seed
    )
    word_start = torch.rand(vocab, generator=gen(seed + 1)) < 0.5
    inputs, labels = mask_tokens(
        ids,
        cfg,
        mask_id=mask_id,
        n_special=n_special,
        vocab_size=vocab,
        generator=gen(seed),
        word_start=word_start,
    )
    selected = check_invariants(
        ids, inputs, labels, n_special=n_special, vocab=vocab, mask_id=mask_id
    ).flatten()
    if cfg.whole_word:
        for w in reference_words(ids, word_start, n_special):
            assert selected[w].all() or not selected[w].any()
