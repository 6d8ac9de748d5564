"""SFT batches: rendered conversations packed into blocks without cross-contamination.

Each example is a conversation rendered by the chat template (`tokenizers/chat.py`) to ids and
a loss mask. An example of L ids fills L - 1 slots of a row: inputs ids[:-1], targets ids[1:]
where the mask is set (IGNORE_INDEX elsewhere).

Two layouts:
- `packed`: several examples share a row of `block_size` slots. Each attends only to itself
  (a block-diagonal causal mask) and its positions restart at 0, so a packed example computes
  exactly what it would alone (tested: same per-example loss). Rows are filled by online
  best-fit over a seeded shuffle of the examples, which wastes a few percent of slots at most.
- `padded`: one example per row, right-padded to the longest row of the micro-batch. Plain
  causal attention already hides the padding from real tokens, so no mask is needed.

Rows are addressed by a global index over epochs (each epoch a fresh seeded shuffle), so the
batch of step s is a pure function of (seed, s): resuming needs only the step.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from lmforge.data.masking import IGNORE_INDEX
from lmforge.errors import UserError
from lmforge.tokenizers import Tokenizer
from lmforge.tokenizers.chat import Turn, render_chat

Layout = Literal["packed", "padded", "seq2seq"]


@dataclass(frozen=True)
class Examples:
    """Rendered conversations: ids and loss mask per example (uint32 / bool arrays)."""

    ids: list[np.ndarray]
    mask: list[np.ndarray]
    n_truncated: int = 0  # examples cut to fit the block
    n_dropped: int = 0  # examples whose reply did not fit at all
    sources: list[np.ndarray] | None = None  # encoder inputs (seq2seq layout only)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def slots(self) -> np.ndarray:
        """Row slots each example needs: its length minus one (the last id is only a target)."""
        return np.array([len(x) - 1 for x in self.ids], dtype=np.int64)

    def slots_in(self, rows: Sequence[Sequence[int]]) -> int:
        """Row slots that hold example tokens (decoder side), over some rows."""
        return int(sum(self.slots[list(r)].sum() for r in rows))

    @property
    def n_trained(self) -> int:
        return int(sum(m[1:].sum() for m in self.mask))


def render_examples(
    tok: Tokenizer,
    conversations: Sequence[Sequence[Turn]],
    block_size: int,
    *,
    train_on_prompt: bool = False,
) -> Examples:
    """Render and cut each conversation to at most block_size + 1 ids. An example whose prompt
    alone fills the block has nothing to train on and is dropped (and counted)."""
    ids, masks, cut, dropped = [], [], 0, 0
    for turns in conversations:
        x, m = render_chat(tok, turns, train_on_prompt=train_on_prompt)
        if len(x) > block_size + 1:
            x, m, cut = x[: block_size + 1], m[: block_size + 1], cut + 1
        if not any(m[1:]):
            dropped += 1
            continue
        ids.append(np.asarray(x, dtype=np.uint32))
        masks.append(np.asarray(m, dtype=bool))
    if not ids:
        raise UserError(
            f"every example's prompt fills the whole block of {block_size} tokens, leaving no "
            "reply to train on; raise train.block_size (up to the model's context)"
        )
    return Examples(ids, masks, cut - dropped, dropped)


def render_seq2seq_examples(
    tok: Tokenizer, conversations: Sequence[Sequence[Turn]], block_size: int
) -> Examples:
    """Encoder-decoder examples, FLAN style: the encoder reads the conversation up to its last
    reply (ending with `<|assistant|>`), the decoder produces that reply and its end-of-turn.
    Both sides are cut to block_size (the source keeps its end, where the question is)."""
    ids, masks, sources, cut = [], [], [], 0
    for turns in conversations:
        src, _ = render_chat(tok, turns[:-1], add_generation_prompt=True)
        reply, m = render_chat(tok, turns[-1:])  # <|bos|><|assistant|>reply<|end_of_turn|>
        tgt = [tok.bos_id] + reply[2:]  # the decoder starts from <|bos|>
        mask = [False] + m[2:]
        if len(src) > block_size or len(tgt) > block_size + 1:
            src, tgt, mask, cut = (
                src[-block_size:],
                tgt[: block_size + 1],
                mask[: block_size + 1],
                cut + 1,
            )
        sources.append(np.asarray(src, dtype=np.uint32))
        ids.append(np.asarray(tgt, dtype=np.uint32))
        masks.append(np.asarray(mask, dtype=bool))
    return Examples(ids, masks, cut, sources=sources)


def best_fit(slots: np.ndarray, order: np.ndarray, capacity: int) -> list[list[int]]:
    """Rows of example indices, taking examples in `order` and putting each in the fullest row
    it still fits (online best-fit bin packing)."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free slots, row), sorted
    for i in order.tolist():
        need = int(slots[i])
        k = bisect.bisect_left(free, (need, -1))
        if k == len(free):
            rows.append([i])
            bisect.insort(free, (capacity - need, len(rows) - 1))
        else:
            room, r = free.pop(k)
            rows[r].append(i)
            bisect.insort(free, (room - need, r))
    return rows


class RowSampler:
    """Rows of examples over epochs: row k of the run is a pure function of (seed, k)."""

    def __init__(self, examples: Examples, block_size: int, layout: Layout, seed: int):
        if len(examples) == 0:
            raise UserError("no training examples")
        self.examples, self.block_size, self.layout, self.seed = examples, block_size, layout, seed
        self._epochs: list[list[list[int]]] = []  # rows of each epoch planned so far
        self._starts: list[int] = [0]  # global index of each epoch's first row

    def _epoch_rows(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.examples))
        if self.layout != "packed":
            return [[i] for i in order.tolist()]
        rows = best_fit(self.examples.slots, order, self.block_size)
        return [rows[j] for j in rng.permutation(len(rows)).tolist()]  # fullest rows not first

    def rows(self, start: int, n: int) -> list[list[int]]:
        """Rows start .. start + n - 1 of the run."""
        while self._starts[-1] < start + n:
            self._epochs.append(self._epoch_rows(len(self._epochs)))
            self._starts.append(self._starts[-1] + len(self._epochs[-1]))
        out = []
        for k in range(start, start + n):
            e = bisect.bisect_right(self._starts, k) - 1
            out.append(self._epochs[e][k - self._starts[e]])
        return out

    def epoch_of(self, row: int) -> float:
        """Epochs completed by the time `row` is reached (fractional)."""
        self.rows(row, 1)
        e = bisect.bisect_right(self._starts, row) - 1
        return e + (row - self._starts[e]) / len(self._epochs[e])


def collate(
    examples: Examples, rows: Sequence[Sequence[int]], layout: Layout, block_size: int
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Model inputs and targets for rows of example indices.

    packed: ((x, positions, mask), y) with x, positions, y (B, block_size) and mask
        (B, 1, T, T), True where a query may attend; padding slots form one more segment that
        attends only to itself, so no attention row is empty.
    padded: ((x,), y) with x, y (B, T), T the longest row; causal attention hides the padding.
    seq2seq: ((src, x, src_mask), y): src (B, S) right-padded, src_mask (B, 1, 1, S).
    """
    longest = max(sum(len(examples.ids[i]) - 1 for i in r) for r in rows)
    T = block_size if layout == "packed" else longest
    B = len(rows)
    x = np.zeros((B, T), dtype=np.int64)
    y = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
    positions = np.zeros((B, T), dtype=np.int64)
    segment = np.full((B, T), -1, dtype=np.int64)
    for b, row in enumerate(rows):
        t = 0
        for s, i in enumerate(row):
            ids, m = examples.ids[i].astype(np.int64), examples.mask[i]
            n = len(ids) - 1
            x[b, t : t + n] = ids[:-1]
            y[b, t : t + n] = np.where(m[1:], ids[1:], IGNORE_INDEX)
            positions[b, t : t + n] = np.arange(n)
            segment[b, t : t + n] = s
            t += n
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    if layout == "padded":
        return (xt,), yt
    if layout == "seq2seq":
        assert examples.sources is not None
        srcs = [examples.sources[r[0]] for r in rows]
        lens = torch.tensor([len(a) for a in srcs])
        src = torch.zeros((B, int(lens.max())), dtype=torch.long)
        for b, a in enumerate(srcs):
            src[b, : len(a)] = torch.from_numpy(a.astype(np.int64))
        valid = torch.arange(src.size(1))[None, :] < lens[:, None]  # (B, S)
        return (src, xt, valid[:, None, None, :]), yt
    seg = torch.from_numpy(segment)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    mask = (seg[:, :, None] == seg[:, None, :]) & causal  # (B, T, T)
    return (xt, torch.from_numpy(positions), mask[:, None]), yt


def pack_sequences(
    seqs: Sequence[Sequence[int]], block_size: int, *, causal: bool = True
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """Pack whole sequences (each at most block_size ids) into rows, in the given order, by
    best fit: ((x, positions, mask), last) with x, positions (R, block_size), mask
    (R, 1, T, T) block-diagonal (causal or not) and `last` (N,) the flat index (row * T + t)
    of each sequence's final token, in input order. Padding slots attend only to themselves."""
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    rows = best_fit(lengths, np.arange(len(seqs)), block_size)
    T = block_size
    x = np.zeros((len(rows), T), dtype=np.int64)
    positions = np.zeros((len(rows), T), dtype=np.int64)
    segment = np.full((len(rows), T), -1, dtype=np.int64)
    last = np.zeros(len(seqs), dtype=np.int64)
    for r, row in enumerate(rows):
        t = 0
        for k, i in enumerate(row):
            n = int(lengths[i])
            x[r, t : t + n] = seqs[i]
            positions[r, t : t + n] = np.arange(n)
            segment[r, t : t + n] = k
            last[i] = r * T + t + n - 1
            t += n
    seg = torch.from_numpy(segment)
    mask = seg[:, :, None] == seg[:, None, :]  # (R, T, T)
    if causal:
        mask &= torch.ones(T, T, dtype=torch.bool).tril()
    else:  # a padding slot sees only itself: padding would otherwise join one segment
        pad = seg < 0
        mask &= ~(pad[:, :, None] & pad[:, None, :]) | torch.eye(T, dtype=torch.bool)
    xt, pt = torch.from_numpy(x), torch.from_numpy(positions)
    return (xt, pt, mask[:, None]), torch.from_numpy(last)
