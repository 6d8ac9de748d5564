"""Masked-token corruption for encoder pretraining, as pure tensor functions.

Follows BERT (Devlin et al., 2019, "BERT: Pre-training of Deep Bidirectional Transformers for
Language Understanding", sec. 3.1): a share `mask_prob` of the tokens is selected for prediction;
of those, 80% are replaced by the mask token, 10% by a random token and 10% left unchanged, so
the model cannot assume that only `<|mask|>` positions matter. Whole-word masking (the later
BERT release, and Cui et al., 2021) selects every piece of a WordPiece word together, so a word
cannot be guessed from its own other pieces.

Key choices:
- Selection is i.i.d. Bernoulli(mask_prob) per token (per word with `whole_word`), as in
  Hugging Face's `DataCollatorForLanguageModeling`, not BERT's fixed count per sequence capped
  at `max_predictions_per_seq`. The 80/10/10 split is drawn per token, also in whole-word mode.
- Special tokens (ids < n_special: pad, eos separators in packed blocks, ...) are never
  selected and never used as random replacements. In whole-word mode a special token ends the
  word before it and belongs to no word, and a block that starts mid-word (a continuation
  piece at position 0) starts a word there.
- At least one token per *batch* is always selected when the batch holds any non-special
  token: if the Bernoulli draws selected none, the non-special position with the highest draw
  is selected (with its whole word in whole-word mode). A cross-entropy whose targets are all
  ignored is nan, and this keeps a tiny batch from producing one; it biases the selection rate
  only for batches so small that they would otherwise often be empty. A batch of only special
  tokens still comes back with no label set; the caller must skip it.
- Deterministic given the generator: the same generator state gives the same masks, so a
  trainer that seeds `torch.Generator().manual_seed(f(seed, step))` reproduces them on resume.
  Random numbers are drawn on the generator's device and moved to `ids.device`, so a CPU
  generator gives the same masks for CPU and GPU batches. Each call draws the same amount of
  randomness whatever the config, three (B, T) tensors.

Shape legend: B batch, T time, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmforge.config import check, opt

# The label of a position that is not predicted. It must equal `lmforge.objectives.lm.IGNORE_INDEX`
# (a test checks); it is repeated here because data sits below objectives in the import layers.
IGNORE_INDEX = -100


@dataclass(frozen=True, kw_only=True)
class MaskingConfig:
    mask_prob: float = opt(0.15, "share of (non-special) tokens selected for prediction")
    replace_with_mask: float = opt(0.8, "of the selected, share replaced by the mask token")
    replace_with_random: float = opt(
        0.1, "of the selected, share replaced by a random token (the rest stay unchanged)"
    )
    whole_word: bool = opt(
        False,
        "select whole words (WordPiece: a word is a word-start token and the '##' pieces after it)",
    )

    def __post_init__(self) -> None:
        check(0 < self.mask_prob < 1, "mask_prob", f"must be in (0, 1) (got {self.mask_prob})")
        check(
            0 <= self.replace_with_mask <= 1,
            "replace_with_mask",
            f"must be in [0, 1] (got {self.replace_with_mask})",
        )
        check(
            0 <= self.replace_with_random <= 1,
            "replace_with_random",
            f"must be in [0, 1] (got {self.replace_with_random})",
        )
        total = self.replace_with_mask + self.replace_with_random
        check(
            total <= 1 + 1e-9,
            "replace_with_random",
            f"replace_with_mask + replace_with_random must be <= 1 (got {total:g})",
        )


def mask_tokens(
    ids: torch.Tensor,
    cfg: MaskingConfig,
    *,
    mask_id: int,
    n_special: int,
    vocab_size: int,
    generator: torch.Generator,
    word_start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt a batch for masked-token prediction.

    ids (B, T) int64; `word_start` (V,) bool, True for ids that begin a word (the tokenizer's
    `word_starts` as a tensor), required when `cfg.whole_word`. Ids 0..n_special-1 are special.
    Pass the tokenizer's vocab size, not a model's padded one: random replacements are uniform
    over [n_special, vocab_size). Returns (inputs, labels), both (B, T) like `ids`: labels hold the
    original id at the selected positions and IGNORE_INDEX elsewhere.
    """
    if ids.dim() != 2:
        raise ValueError(f"ids must be (B, T), got shape {tuple(ids.shape)}")
    if not 0 <= n_special < vocab_size:
        raise ValueError(f"need 0 <= n_special < vocab_size (got {n_special}, {vocab_size})")
    B, T = ids.shape
    dev = ids.device
    if ids.numel() == 0:
        return ids.clone(), torch.full_like(ids, IGNORE_INDEX)

    def rand() -> torch.Tensor:  # (B, T) uniform [0, 1), drawn where the generator lives
        return torch.rand((B, T), generator=generator, device=generator.device).to(dev)

    select_draw, action_draw = rand(), rand()
    random_ids = torch.randint(
        n_special, vocab_size, (B, T), generator=generator, device=generator.device
    ).to(dev, ids.dtype)

    special = ids < n_special  # (B, T)
    if cfg.whole_word:
        if word_start is None or word_start.dim() != 1:
            raise ValueError("whole_word masking needs word_start, a (V,) bool tensor")
        # A word starts at a word-start token, at position 0 (a block cut mid-word), and at a
        # special token: the special is never selected, so the '##' pieces after it (if any)
        # make a word of their own, drawn apart from the word before the special.
        starts = word_start.to(dev)[ids] | special  # (B, T)
        starts[:, 0] = True
        word = starts.long().cumsum(1) - 1  # (B, T) word index within the row, in [0, T)
        word = word + torch.arange(B, device=dev).unsqueeze(1) * T  # unique across the batch
        # One draw per word: row r's words use select_draw[r, :n_words], spread to their tokens.
        select_draw = select_draw.flatten()[word]  # (B, T)
    else:
        word = torch.arange(B * T, device=dev).view(B, T)  # every token is its own word

    selected = (select_draw < cfg.mask_prob) & ~special  # (B, T)
    # Guarantee one selection per batch without a host sync: the fallback word is computed
    # always and kept only when nothing was selected (and dropped if it is a special token).
    best = select_draw.masked_fill(special, -1.0).flatten().argmax()
    fallback = (word == word.flatten()[best]) & ~special & ~selected.any()
    selected = selected | fallback

    to_mask = selected & (action_draw < cfg.replace_with_mask)
    to_random = (
        selected
        & (action_draw >= cfg.replace_with_mask)
        & (action_draw < cfg.replace_with_mask + cfg.replace_with_random)
    )
    inputs = torch.where(to_mask, torch.full_like(ids, mask_id), ids)
    inputs = torch.where(to_random, random_ids, inputs)
    labels = torch.where(selected, ids, torch.full_like(ids, IGNORE_INDEX))
    return inputs, labels
