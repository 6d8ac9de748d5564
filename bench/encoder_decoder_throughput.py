"""Span-corruption training throughput (tokens/s) of lmforge's encoder-decoder vs Hugging Face T5.

Measured: the wall time of one full optimizer step (encoder forward, teacher-forced decoder
forward, loss over every target position, backward, clip 1.0, AdamW step, zero_grad) on
T5-span-corrupted random token data, reported as tokens/s = batch * (encoder input length +
decoder target length) / median step time, plus raw-text tokens/s = batch * raw block length /
median step time (the text a step consumes before corruption), plus MFU = training FLOPs per
step / step time / 900e9 (as in train_throughput.py, a yardstick, also for fp32).

Data: random raw blocks of ids in [9, 4096) (ids below 9 are lmforge's special tokens), of the
raw length whose corrupted input is exactly 256 tokens (`raw_length_for(256, SpanConfig())`),
corrupted once up front, outside the timed region, by lmforge's `corrupt_spans(raw,
SpanConfig(), first_sentinel=4096, n_sentinels=span_counts(raw_len)[1], eos_id=2,
generator=torch.Generator().manual_seed(i))`: 15% of the tokens dropped in spans of mean length
3, each span replaced by a sentinel in the input; the target lists each span's sentinel and its
tokens; both end with eos. The decoder input is [bos=1] + target[:-1], as
`lmforge.training.pretrain` builds it. Step i of every repeat and variant uses batch i, so both
sides do the same work.

lmforge is built exactly as `lmforge.training.pretrain` builds it for arch=encoder_decoder:
`EncoderDecoder(TransformerConfig(vocab_size=4096 + n_sentinels, ...))`,
`build_optimizer(model, OptimConfig())`, autocast dtype from `autocast_dtype("auto", cpu)`,
and each step is `train_step(model, optimizer, [((inputs, dec_in), targets)], token_loss,
grad_clip=1.0)` (the model is called as model(inputs, dec_in)); measured eager and with
`forward=torch.compile(model)` (compile time = first step minus a typical step, reported
separately and excluded from tokens/s; with a cold TorchInductor cache unless
`--keep-inductor-cache`; `--no-compile` skips it).

Peer: `transformers.T5ForConditionalGeneration` (num_layers 3, num_decoder_layers 3, d_model
384, num_heads 6, d_kv 64, d_ff 1024 with feed_forward_proj "gated-gelu", dropout_rate 0,
vocab_size 4096 + n_sentinels, tie_word_embeddings) called with input_ids=inputs,
decoder_input_ids=dec_in, labels=targets; HF computes the loss (cross-entropy). Plain loop:
backward, clip_grad_norm_ 1.0, AdamW fused=True when available, zero_grad(set_to_none=True); in
fp32 and under `torch.autocast("cpu", torch.bfloat16)`; peer best = the faster of the two.

Shape ("same total layers"): 3 encoder + 3 decoder layers, 6 heads, 384 wide (lmforge's SwiGLU
width 8/3 * 384 = 1024, T5's gated-GELU width 1024), encoder input 256, batch 8, vocab 4096 +
sentinels.
Timing: per repeat and variant, `--warmup` untimed steps then `--steps` timed steps; the
variant's figure is the median step time over all repeats, run interleaved (ours, peer, ours,
...) to spread machine noise.
Target (issue): lmforge best >= 1.5x peer best tokens/s.
Results: bench/results/encoder_decoder_throughput.json.
"""

from __future__ import annotations

from dataclasses import dataclass

import _common as common
import torch

from lmforge.data.spans import SpanConfig, corrupt_spans, lengths_for, raw_length_for, span_counts
from lmforge.models.encoder_decoder import EncoderDecoder
from lmforge.models.transformer import TransformerConfig

TARGET = 1.5
N_SPECIAL = 9  # len(lmforge.tokenizers.algos.SPECIAL_TOKENS)
BOS_ID = 1  # lmforge's <|bos|>
EOS_ID = 2  # lmforge's <|eos|>

# ((inputs (B, I), dec_in (B, T)), targets (B, T)): the model is called as model(inputs, dec_in)
Batch = tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Shape:
    n_layer: int  # encoder blocks
    n_decoder_layer: int
    n_head: int
    n_embd: int
    input_len: int  # encoder input tokens after corruption
    batch: int
    vocab: int  # before sentinels; the first sentinel id


SHAPE = Shape(
    n_layer=3, n_decoder_layer=3, n_head=6, n_embd=384, input_len=256, batch=8, vocab=4096
)


@dataclass(frozen=True)
class Lengths:
    raw: int  # raw block length
    input: int  # encoder input I
    target: int  # decoder target T
    n_sentinels: int

    @classmethod
    def of(cls, s: Shape, spans: SpanConfig) -> Lengths:
        raw = raw_length_for(s.input_len, spans)
        inp, tgt = lengths_for(raw, spans)
        return cls(raw=raw, input=inp, target=tgt, n_sentinels=span_counts(raw, spans)[1])


def encdec_flops_per_step(
    *,
    d_model: int,
    attn_inner: int,
    d_ff: int,
    n_enc: int,
    n_dec: int,
    vocab: int,
    batch: int,
    src_len: int,
    tgt_len: int,
) -> float:
    """Training FLOPs of one step: 6 * matmul weights * the tokens each one sees, plus attention
    at 12·D·(keys) per query token and layer (PaLM appendix B, no causal halving, as
    `decoder_flops_per_token`). Multi-head attention with q/k/v/o of D x attn_inner, a gated
    MLP (3 matrices of D x d_ff), and cross-attention whose k/v projections run on the S
    encoder outputs and q/o on the T decoder tokens; the LM head runs on the T targets.
    Embedding lookups, norms and T5's relative position biases are not counted."""
    D, S, T = d_model, src_len, tgt_len
    attn = 4 * D * attn_inner
    mlp = 3 * D * d_ff
    enc = n_enc * (attn + mlp)  # weights each encoder token passes through
    dec = n_dec * (attn + 2 * D * attn_inner + mlp) + D * vocab  # each decoder token
    cross_kv = n_dec * 2 * D * attn_inner  # each encoder output, once per decoder layer
    matmul = 6 * (S * (enc + cross_kv) + T * dec)
    attention = 12 * D * (n_enc * S * S + n_dec * T * (T + S))
    return batch * (matmul + attention)


def model_config(s: Shape, n: Lengths) -> TransformerConfig:
    return TransformerConfig(
        vocab_size=s.vocab + n.n_sentinels,
        n_layer=s.n_layer,
        n_decoder_layer=s.n_decoder_layer,
        n_head=s.n_head,
        n_embd=s.n_embd,
        max_seq_len=max(n.input, n.target),
    )


def span_batches(s: Shape, n: Lengths, spans: SpanConfig, count: int, seed: int) -> list[Batch]:
    """`count` span-corrupted batches, batch i corrupted with generator seed i, decoder input
    [bos] + target[:-1] as lmforge's pretrain builds it; made before any timing."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        raw = torch.randint(N_SPECIAL, s.vocab, (s.batch, n.raw), generator=g)
        inputs, targets = corrupt_spans(
            raw,
            spans,
            first_sentinel=s.vocab,
            n_sentinels=n.n_sentinels,
            eos_id=EOS_ID,
            generator=torch.Generator().manual_seed(i),
        )
        assert inputs.shape == (s.batch, n.input) and targets.shape == (s.batch, n.target)
        dec_in = torch.cat([torch.full_like(targets[:, :1], BOS_ID), targets[:, :-1]], dim=1)
        out.append(((inputs, dec_in), targets))
    return out


def hf_t5(s: Shape, n: Lengths, d_ff: int) -> torch.nn.Module:
    """The peer model: a randomly initialised `transformers.T5ForConditionalGeneration`."""
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(
        vocab_size=s.vocab + n.n_sentinels,
        d_model=s.n_embd,
        d_kv=s.n_embd // s.n_head,
        d_ff=d_ff,
        num_layers=s.n_layer,
        num_decoder_layers=s.n_decoder_layer,
        num_heads=s.n_head,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=EOS_ID,
        decoder_start_token_id=BOS_ID,
    )
    return T5ForConditionalGeneration(cfg)


def t5_step(s: Shape, n: Lengths, d_ff: int, bf16: bool) -> common.Step:
    model = hf_t5(s, n, d_ff)
    model.train()
    optimizer = common.peer_adamw(model.parameters(), lr=1e-3)

    def step(inputs: tuple[torch.Tensor, torch.Tensor], y: torch.Tensor, i: int) -> None:
        x, dec_in = inputs
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss = model(input_ids=x, decoder_input_ids=dec_in, labels=y).loss  # HF's CE
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    args, _inductor_dir = common.throughput_args(common.base_parser(__doc__))

    s, spans = SHAPE, SpanConfig()
    n = Lengths.of(s, spans)
    cfg = model_config(s, n)
    d_ff = cfg.ff_width  # 1024 at 384 wide: T5's gated-GELU gets the same width
    tokens = s.batch * (n.input + n.target)  # per step: encoder inputs + decoder targets
    raw_tokens = s.batch * n.raw
    print(f"== encoder_decoder: {s}, {n}", flush=True)
    # Corruption is data preparation, not part of a step: done once, outside the timed region.
    batches = span_batches(s, n, spans, args.warmup + args.steps, args.seed)
    # Ours and the peer's alternate, so slow phases of a shared machine hit both.
    steps = {
        "lmforge_eager": common.lmforge_step(EncoderDecoder(cfg), compiled=False),
        "hf_fp32": t5_step(s, n, d_ff, bf16=False),
    }
    if not args.no_compile:
        steps["lmforge_compile"] = common.lmforge_step(EncoderDecoder(cfg), compiled=True)
    steps["hf_bf16"] = t5_step(s, n, d_ff, bf16=True)
    times, first_step_s = common.time_variants(steps, batches, args, tokens)

    assert cfg.kv_heads == cfg.n_head  # the FLOPs formula assumes full multi-head attention
    shared = dict(n_enc=s.n_layer, n_dec=s.n_decoder_layer, batch=s.batch)
    lengths = dict(src_len=n.input, tgt_len=n.target)
    flops_ours = encdec_flops_per_step(
        d_model=cfg.n_embd,
        attn_inner=cfg.n_head * cfg.head_size,
        d_ff=cfg.ff_width,
        vocab=cfg.vocab_size,
        **shared,
        **lengths,
    )
    flops_t5 = encdec_flops_per_step(
        d_model=s.n_embd,
        attn_inner=s.n_head * (s.n_embd // s.n_head),
        d_ff=d_ff,
        vocab=s.vocab + n.n_sentinels,
        **shared,
        **lengths,
    )

    def metrics(v: str, med: float) -> dict[str, float]:
        flops = flops_ours if v.startswith("lmforge") else flops_t5
        return {
            "tokens_per_s": tokens / med,
            "raw_tokens_per_s": raw_tokens / med,
            "flops_per_step": flops,
            "flops_per_token": flops / tokens,
            "mfu": flops / med / common.CPU_PEAK_FLOPS,
        }

    spans_info = {
        **spans.__dict__,
        "first_sentinel": s.vocab,
        "eos_id": EOS_ID,
        "bos_id": BOS_ID,
        "raw_id_range": [N_SPECIAL, s.vocab],
        "span_seed": "step index i",
    }
    result = common.throughput_result(
        times,
        first_step_s,
        metrics,
        TARGET,
        shape=s.__dict__,
        lengths=n.__dict__,
        d_ff=d_ff,
        tokens_per_step=tokens,
        raw_tokens_per_step=raw_tokens,
        spans=spans_info,
    )

    target = f"lmforge encoder-decoder best >= {TARGET}x T5ForConditionalGeneration best tokens/s"
    common.write_throughput("encoder_decoder_throughput", args, target, {"encoder_decoder": result})
    rows = common.throughput_rows(result, extra=["raw_tokens_per_s"])
    print(common.table(["variant", "tok/s", "raw tok/s", "MFU", "step s"], rows))


if __name__ == "__main__":
    main()
