"""Masked-token training throughput (tokens/s) of lmforge's encoder vs Hugging Face BERT.

Measured: the wall time of one full optimizer step (forward, masked-token loss, backward, clip
1.0, AdamW step, zero_grad) on BERT-masked random token data, reported as tokens/s = batch *
context / median step time (every position of the block counts, not only the predicted ones),
plus MFU = tokens/s * training FLOPs per token / 900e9 (as in train_throughput.py, a yardstick).

Data: random ids in [9, 4096) (ids below 9 are lmforge's special tokens, which are never
selected), corrupted once up front, outside the timed region, by lmforge's
`mask_tokens(ids, MaskingConfig(), mask_id=4, n_special=9, vocab_size=4096,
generator=torch.Generator().manual_seed(i))`: 15% of the tokens selected, of those 80% -> mask
id, 10% -> random id, 10% unchanged; labels hold the original id at the selected positions and
-100 elsewhere. Step i of every repeat and variant uses batch i, so both sides do the same work.

lmforge is built exactly as `lmforge.training.pretrain` builds it for arch=encoder:
`Encoder(TransformerConfig)`, `build_optimizer(model, OptimConfig())`, autocast dtype from
`autocast_dtype("auto", cpu)`, and each step is `train_step(..., token_loss, grad_clip=1.0)`
(loss only on the labelled positions); measured eager and with `forward=torch.compile(model)`
(compile time = first step minus a typical step, reported separately and excluded from tokens/s;
with a cold TorchInductor cache unless `--keep-inductor-cache`; `--no-compile` skips it).

Peer: `transformers.BertForMaskedLM` (intermediate_size 4*384, hidden and attention dropout 0,
max_position_embeddings 256, type_vocab_size 1) fed the same corrupted inputs and labels; HF
computes the loss (cross-entropy, -100 ignored). Plain loop: backward, clip_grad_norm_ 1.0,
AdamW fused=True when available, zero_grad(set_to_none=True); in fp32 and under
`torch.autocast("cpu", torch.bfloat16)`; peer best = the faster of the two.

Shape: 6 layers, 6 heads, 384 wide, context 256, batch 8, vocab 4096.
Timing: per repeat and variant, `--warmup` untimed steps then `--steps` timed steps; the
variant's figure is the median step time over all repeats, run interleaved (ours, peer, ours,
...) to spread machine noise.
Target (issue): lmforge best >= 1.5x peer best. Results: bench/results/encoder_throughput.json.
"""

from __future__ import annotations

from dataclasses import dataclass

import _common as common
import torch

from lmforge.data.masking import MaskingConfig, mask_tokens
from lmforge.models.encoder import Encoder
from lmforge.models.transformer import TransformerConfig
from lmforge.training.metrics import decoder_flops_per_token

TARGET = 1.5
MASK_ID = 4  # lmforge's <|mask|>
N_SPECIAL = 9  # len(lmforge.tokenizers.algos.SPECIAL_TOKENS)

Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs, labels), both (B, T)


@dataclass(frozen=True)
class Shape:
    n_layer: int
    n_head: int
    n_embd: int
    context: int
    batch: int
    vocab: int


SHAPE = Shape(n_layer=6, n_head=6, n_embd=384, context=256, batch=8, vocab=4096)


def bert_flops_per_token(s: Shape) -> float:
    """6N + 12·L·D·T, N = matmul weights: 12·L·D² in the blocks (4·D² attention, 2·D·4D MLP)
    plus the MLM head (its D·D transform and the D·V decoder)."""
    n = 12 * s.n_layer * s.n_embd**2 + s.n_embd**2 + s.n_embd * s.vocab
    return 6 * n + 12 * s.n_layer * s.n_embd * s.context


def encoder_config(s: Shape) -> TransformerConfig:
    return TransformerConfig(
        vocab_size=s.vocab,
        n_layer=s.n_layer,
        n_head=s.n_head,
        n_embd=s.n_embd,
        max_seq_len=s.context,
    )


def masked_batches(s: Shape, n: int, seed: int) -> list[Batch]:
    """n BERT-masked batches, batch i masked with generator seed i; made before any timing."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(N_SPECIAL, s.vocab, (s.batch, s.context), generator=g)
        out.append(
            mask_tokens(
                ids,
                MaskingConfig(),
                mask_id=MASK_ID,
                n_special=N_SPECIAL,
                vocab_size=s.vocab,
                generator=torch.Generator().manual_seed(i),
            )
        )
    return out


def hf_bert(s: Shape) -> torch.nn.Module:
    """The peer model: a randomly initialised `transformers.BertForMaskedLM`, dropout 0."""
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(
        vocab_size=s.vocab,
        hidden_size=s.n_embd,
        num_hidden_layers=s.n_layer,
        num_attention_heads=s.n_head,
        intermediate_size=4 * s.n_embd,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=s.context,
        type_vocab_size=1,
    )
    return BertForMaskedLM(cfg)


def bert_step(s: Shape, bf16: bool) -> common.Step:
    model = hf_bert(s)
    model.train()
    optimizer = common.peer_adamw(model.parameters(), lr=1e-3)

    def step(x: torch.Tensor, y: torch.Tensor, i: int) -> None:
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss = model(input_ids=x, labels=y).loss  # HF's cross-entropy, -100 ignored
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    args, _inductor_dir = common.throughput_args(common.base_parser(__doc__))

    s = SHAPE
    print(f"== encoder: {s}", flush=True)
    # Masking is data preparation, not part of a step: done once, outside the timed region.
    batches = masked_batches(s, args.warmup + args.steps, args.seed)
    selected = [int((y != -100).sum()) for _, y in batches]
    # Ours and the peer's alternate, so slow phases of a shared machine hit both.
    cfg = encoder_config(s)
    steps = {
        "lmforge_eager": common.lmforge_step(Encoder(cfg), compiled=False),
        "hf_fp32": bert_step(s, bf16=False),
    }
    if not args.no_compile:
        steps["lmforge_compile"] = common.lmforge_step(Encoder(cfg), compiled=True)
    steps["hf_bf16"] = bert_step(s, bf16=True)
    tokens = s.batch * s.context
    times, first_step_s = common.time_variants(steps, batches, args, tokens)

    flops_ours = decoder_flops_per_token(cfg, s.context)
    metrics = common.per_token_metrics(tokens, flops_ours, bert_flops_per_token(s))
    masking = {
        **MaskingConfig().__dict__,
        "mask_id": MASK_ID,
        "n_special": N_SPECIAL,
        "mask_seed": "step index i",
        "selected_per_batch": selected,
    }
    result = common.throughput_result(
        times, first_step_s, metrics, TARGET, shape=s.__dict__, masking=masking
    )

    target = f"lmforge encoder best >= {TARGET}x BertForMaskedLM best tokens/s"
    common.write_throughput("encoder_throughput", args, target, {"encoder": result})
    rows = common.throughput_rows(result)
    print(common.table(["variant", "tok/s", "MFU", "step s"], rows))


if __name__ == "__main__":
    main()
