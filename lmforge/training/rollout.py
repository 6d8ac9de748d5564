"""Rollouts: what PPO, GRPO, best-of-n and the aligned-model eval share.

A rollout is a batch of prompts with one sampled response each (KV-cache generation), laid out
for the RL maths: every row is prompt + response, right-padded; the response positions of each
row are gathered into (B, R) tensors (`Rollout.gather`). A response that stopped keeps its
`<|end_of_turn|>` as its last token, so the policy is credited (or blamed) for ending.

The log-prob, value and update passes run on the rows packed (`Rollout.packed`): prompts vary
in length, so right-padded rows are mostly padding when one prompt is long; packed, the rows'
real tokens share fewer, full rows (a block-diagonal causal mask keeps them apart), which
gives the same outputs from fewer token positions.

Rewards for a response come from a table (`REWARDS`): the reward model's score, or, on world
prompts, the gold reward (0-1) or the task checker alone (1 correct, 0 not: a verifiable reward).

Shape legend: B rows, T prompt + response, R response positions, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lmforge.data.sft_batches import pack_sequences
from lmforge.data.world_tasks import TaskExample, is_correct
from lmforge.errors import UserError
from lmforge.feedback.sampling import Prompt, prompt_ids
from lmforge.feedback.simulated import gold_score
from lmforge.generation.generate import SamplingConfig, generate
from lmforge.models.decoder import Decoder
from lmforge.models.reward import RewardModel, ValueHead
from lmforge.objectives.lm import token_logprobs
from lmforge.objectives.rl import entropy
from lmforge.tokenizers import Tokenizer
from lmforge.tokenizers.chat import end_of_turn_id


@dataclass(frozen=True)
class Rollout:
    ids: torch.Tensor  # (B, T) prompt + response, right-padded
    start: torch.Tensor  # (B,) position of each row's first response token
    response: torch.Tensor  # (B, R) response ids (pad past the end)
    mask: torch.Tensor  # (B, R) float, 1 on response tokens
    stopped: torch.Tensor  # (B,) bool: ended with <|end_of_turn|>
    texts: list[str]  # decoded responses (without <|end_of_turn|>)
    prompts: list[Prompt]  # the prompt of each row

    def __len__(self) -> int:
        return self.ids.size(0)

    def gather(self, per_position: torch.Tensor) -> torch.Tensor:
        """Values at the positions that predict each response token: (B, T, ...) -> (B, R, ...).

        The output at position p predicts token p + 1, so response token j of a row is read at
        start - 1 + j (clamped inside the row for padding, which `mask` hides)."""
        R, T = self.response.size(1), per_position.size(1)
        pos = (self.start[:, None] - 1 + torch.arange(R, device=self.start.device)).clamp_max(T - 1)
        if per_position.dim() == 3:
            pos = pos[..., None].expand(-1, -1, per_position.size(-1))
        return per_position.gather(1, pos)

    def end(self) -> torch.Tensor:
        """(B,) position one past each row's last response token (its real length)."""
        return self.start + self.mask.sum(dim=1).long()

    def last_index(self) -> torch.Tensor:
        """Flat indices into B * T of each row's last response token (what a reward model reads)."""
        B, T = self.ids.shape
        return torch.arange(B, device=self.ids.device) * T + self.end() - 1

    def reply_mask(self) -> torch.Tensor:
        """(B, T) bool: True on each row's response tokens (what a reward model's likelihood
        term sums)."""
        t = torch.arange(self.ids.size(1), device=self.ids.device)
        return (t[None, :] >= self.start[:, None]) & (t[None, :] < self.end()[:, None])

    def packed(self) -> Packed:
        """The rows' real tokens packed by best fit into rows as long as the longest of them;
        or, where that saves no position (rows of one length), the rows as they are, cut to
        the longest (plain causal attention, no mask)."""
        lengths = self.end().tolist()
        n, T, R = torch.tensor(lengths), max(lengths), self.response.size(1)
        # position start - 1 + j predicts response token j; padding reads the row's last token
        pos = (self.start.cpu()[:, None] - 1 + torch.arange(R)).clamp_max(n[:, None] - 1)
        seqs = [r[:k] for r, k in zip(self.ids.tolist(), lengths, strict=True)]
        (ids, positions, mask), last = pack_sequences(seqs, T)
        device = self.ids.device
        if len(ids) == len(self):
            first = torch.arange(len(self)) * T  # flat index of each row's first token
            return Packed(self.ids[:, :T], None, None, (first[:, None] + pos).to(device))
        first = last - n + 1
        return Packed(
            ids.to(device), positions.to(device), mask.to(device), (first[:, None] + pos).to(device)
        )

    def to(self, device: torch.device) -> Rollout:
        return dataclasses.replace(
            self,
            ids=self.ids.to(device),
            start=self.start.to(device),
            response=self.response.to(device),
            mask=self.mask.to(device),
            stopped=self.stopped.to(device),
        )

    def select(self, rows: torch.Tensor) -> Rollout:
        keep = rows.tolist()
        return Rollout(
            self.ids[rows],
            self.start[rows],
            self.response[rows],
            self.mask[rows],
            self.stopped[rows],
            [self.texts[i] for i in keep],
            [self.prompts[i] for i in keep],
        )


@dataclass(frozen=True)
class Packed:
    """A rollout's rows packed for the forward passes (N packed rows of L positions)."""

    ids: torch.Tensor  # (N, L)
    positions: torch.Tensor | None  # (N, L) restarting at 0 for each sequence (None: 0..L-1)
    mask: torch.Tensor | None  # (N, 1, L, L) block-diagonal causal, True where a query may
    # attend (None: plain causal, one sequence per row)
    index: torch.Tensor  # (B, R) flat index into N * L of the position predicting each token

    def gather(self, per_position: torch.Tensor) -> torch.Tensor:
        """(N, L, ...) -> (B, R, ...): what `Rollout.gather` reads from the padded rows."""
        flat = per_position.reshape(-1, *per_position.shape[2:])  # (N * L, ...)
        return flat[self.index]


def rollout(
    policy: Decoder,
    tok: Tokenizer,
    prompts: Sequence[Prompt],
    sampling: SamplingConfig,
    batch_size: int = 64,
    row_seeds: Sequence[int] | None = None,
) -> Rollout:
    """One sampled response per prompt (repeat a prompt in `prompts` for several), on the
    policy's device. `row_seeds`: a sampling seed per prompt (see `generate`), in place of
    `sampling.seed`."""
    eot = end_of_turn_id(tok)
    ids = prompt_ids(tok, prompts)
    responses: list[list[int]] = []
    for b, i in enumerate(range(0, len(ids), batch_size)):
        cfg = SamplingConfig(**{**sampling.__dict__, "seed": sampling.seed + b})
        seeds = None if row_seeds is None else row_seeds[i : i + batch_size]
        part = ids[i : i + batch_size]
        responses += generate(policy, part, cfg, eos_id=eot, pad_id=tok.pad_id, row_seeds=seeds)
    stopped = [len(r) < sampling.max_new_tokens for r in responses]  # eot took a slot
    texts = [tok.decode(r) for r in responses]
    full = [r + [eot] if s else r for r, s in zip(responses, stopped, strict=True)]
    ro = build_rollout(ids, full, stopped, texts, list(prompts), tok.pad_id)
    return ro.to(policy.tok_emb.weight.device)


def build_rollout(
    prompt_tokens: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    stopped: Sequence[bool],
    texts: list[str],
    prompts: list[Prompt],
    pad_id: int,
) -> Rollout:
    B = len(prompt_tokens)
    R = max(1, max(len(r) for r in responses))
    T = max(len(p) + len(r) for p, r in zip(prompt_tokens, responses, strict=True))
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    response = torch.full((B, R), pad_id, dtype=torch.long)
    mask = torch.zeros((B, R))
    for b, (p, r) in enumerate(zip(prompt_tokens, responses, strict=True)):
        ids[b, : len(p) + len(r)] = torch.tensor([*p, *r], dtype=torch.long)
        response[b, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[b, : len(r)] = 1
    start = torch.tensor([len(p) for p in prompt_tokens])
    return Rollout(ids, start, response, mask, torch.tensor(stopped), texts, prompts)


def response_logprobs(
    model: Decoder, ro: Rollout, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(response token) (B, R) under `model` at the sampling temperature, and the entropy
    at each position."""
    logp, ent, _ = response_outputs(model, ro, temperature, with_entropy)
    return logp, ent


def response_outputs(
    model: Decoder,
    ro: Rollout,
    temperature: float = 1.0,
    with_entropy: bool = False,
    value_head: ValueHead | None = None,
    pk: Packed | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """`response_logprobs` and, given a value head on `model`'s trunk, the values (B, R) at the
    positions that predict each response token: one trunk pass gives both. The heads run only
    where a response token is predicted (prompt positions would be most of their work).
    `pk`: `ro.packed()`, when the caller has it already."""
    pk = pk if pk is not None else ro.packed()
    h = pk.gather(model.hidden_states(pk.ids, positions=pk.positions, mask=pk.mask))  # (B, R, D)
    logits = model.lm_head(h)  # (B, R, V)
    if temperature not in (0.0, 1.0):
        logits = logits / temperature
    logp = token_logprobs(logits, ro.response) * ro.mask
    ent = entropy(logits) * ro.mask if with_entropy else None
    values = None if value_head is None else value_head(h)
    return logp, ent, values


class UpdateForward(torch.nn.Module):
    """The policy (and PPO's critic: a network of its own, or a value head on the policy's
    trunk) behind one `forward` that gives what a minibatch update needs: DDP averages the
    gradients of the modules it wraps only when their forward runs through it, so under
    torchrun `distributed.wrap` wraps this."""

    def __init__(self, policy: Decoder, critic: RewardModel | ValueHead | None = None):
        super().__init__()
        self.policy, self.critic = policy, critic

    def forward(
        self, ro: Rollout, temperature: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(log-probs (B, R), entropies (B, R), the critic's values (B, R) or None)."""
        logp, ent, values = policy_and_values(self.policy, self.critic, ro, temperature, True)
        assert ent is not None
        return logp, ent, values


def policy_and_values(
    policy: Decoder,
    critic: RewardModel | ValueHead | None,
    ro: Rollout,
    temperature: float,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """`response_outputs` of the policy, with the values (B, R) of its critic (None without
    one): a value head reads the policy's own pass, a critic network makes a pass of its own
    over the same packed rows."""
    pk = ro.packed()
    head = critic if isinstance(critic, ValueHead) else None
    logp, ent, values = response_outputs(policy, ro, temperature, with_entropy, head, pk)
    if isinstance(critic, RewardModel):
        values = pk.gather(critic.values(pk.ids, positions=pk.positions, mask=pk.mask))
    return logp, ent, values


# -------------------------------------------------------------------------------------------
# Rewards


def _example(p: Prompt) -> TaskExample:
    if p.task is None or p.answer is None:
        raise UserError(
            f"prompt {p.id}: the gold and checker rewards need world prompts (with a task and "
            "answer); use reward=model with a reward model"
        )
    return TaskExample(p.task, p.messages[-1].content, p.answer)


def gold_rewards(ro: Rollout) -> torch.Tensor:
    """The world's gold reward (0-1) of each response."""
    return torch.tensor(
        [
            gold_score(_example(p), t, bool(s))
            for p, t, s in zip(ro.prompts, ro.texts, ro.stopped.tolist(), strict=True)
        ],
        device=ro.ids.device,
    )


def checker_rewards(ro: Rollout) -> torch.Tensor:
    """1 where the task's checker accepts the answer, else 0 (a verifiable reward)."""
    return torch.tensor(
        [float(is_correct(_example(p), t)) for p, t in zip(ro.prompts, ro.texts, strict=True)],
        device=ro.ids.device,
    )


@torch.no_grad()
def model_rewards(rm: RewardModel, ro: Rollout, batch_size: int = 64) -> torch.Tensor:
    """The reward model's score of each response, read at its last token."""
    out = []
    for i in range(0, len(ro), batch_size):
        part = ro.select(torch.arange(i, min(i + batch_size, len(ro))))
        out.append(rm(part.ids, part.last_index(), reply=part.reply_mask()))
    return torch.cat(out)


REWARDS: dict[str, Callable[[Rollout, RewardModel | None], torch.Tensor]] = {
    "model": lambda ro, rm: model_rewards(rm, ro) if rm is not None else _need_rm(),
    "gold": lambda ro, rm: gold_rewards(ro),
    "checker": lambda ro, rm: checker_rewards(ro),
}


def _need_rm() -> torch.Tensor:
    raise UserError("reward=model needs a reward model (--reward RM_DIR)")


@torch.no_grad()
def sample_metrics(
    policy: Decoder,
    tok: Tokenizer,
    prompts: Sequence[Prompt],
    sampling: SamplingConfig,
    *,
    reference: Decoder | None = None,
    rm: RewardModel | None = None,
) -> tuple[dict[str, float], Rollout]:
    """How a policy's samples score: gold reward and exact match (world prompts), reward-model
    score, KL to the reference (summed over the response, k1 on the policy's own samples, an
    unbiased estimate), length and stop rate."""
    was = policy.training
    policy.eval()
    ro = rollout(policy, tok, prompts, sampling)
    row = {
        "sample_len": float(ro.mask.sum(1).mean()),
        "sample_stop_rate": float(ro.stopped.float().mean()),
    }
    if all(p.task is not None for p in ro.prompts):
        row["gold"] = float(gold_rewards(ro).mean())
        row["sample_em"] = float(checker_rewards(ro).mean())
    if rm is not None:
        row["rm_score"] = float(model_rewards(rm, ro).mean())
    if reference is not None:
        logp, _ = response_logprobs(policy, ro, temperature=sampling.temperature)
        ref, _ = response_logprobs(reference, ro, temperature=sampling.temperature)
        row["kl"] = float((logp - ref).sum(1).mean())
    policy.train(was)
    return row, ro
