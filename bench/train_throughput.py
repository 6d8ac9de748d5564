"""Training throughput (tokens/s) of lmforge vs Hugging Face GPT-2, side by side.

Measured: the wall time of one full optimizer step (forward, loss, backward, clip 1.0, AdamW
step, zero_grad) on random token data, reported as tokens/s = batch * context / median step
time, plus MFU = tokens/s * training FLOPs per token / 900e9 (the bf16 matmul peak of 2 threads
on the reference machine; it is only a common yardstick, also for fp32 runs).

lmforge is built exactly as `lmforge.training.pretrain` builds it: `Decoder(TransformerConfig)`,
`build_optimizer(model, OptimConfig())`, autocast dtype from `autocast_dtype("auto", cpu)`, and
each step is `train_step(...)`; measured eager and with `forward=torch.compile(model)` (compile
time = first step minus a typical step, reported separately and excluded from tokens/s; with a
cold TorchInductor cache unless `--keep-inductor-cache`; `--no-compile` skips the variant).

Peer: `transformers.GPT2LMHeadModel` with the same n_layer/n_head/n_embd/vocab/context, dropout
0, in a plain PyTorch loop (logits -> float32 cross-entropy, backward, clip_grad_norm_ 1.0,
AdamW fused=True when available, zero_grad(set_to_none=True)), in fp32 and under
`torch.autocast("cpu", torch.bfloat16)`; peer best = the faster of the two.

Shapes: "large" 6 layers, 6 heads, 384 wide, context 256, batch 8, vocab 4096; "baby"
(nanoGPT's CPU shape) 4/4/128, context 64, batch 12, vocab 65.
Timing: per repeat and variant, `--warmup` untimed steps then `--steps` timed steps; the
variant's figure is the median step time over all repeats, run interleaved (ours, peer, ours,
...) to spread machine noise.
Target (issue): lmforge best >= 1.5x peer best at both shapes. Reference figures on the
reference machine: HF large fp32 ~1.9k tok/s, bf16 ~4.5k; HF baby ~19k tok/s.
Data: none (random tokens). Results: bench/results/train_throughput.json.
"""

from __future__ import annotations

from dataclasses import dataclass

import _common as common
import torch
import torch.nn.functional as F

from lmforge.models.decoder import Decoder
from lmforge.models.transformer import TransformerConfig
from lmforge.training.metrics import decoder_flops_per_token

TARGET = 1.5


@dataclass(frozen=True)
class Shape:
    n_layer: int
    n_head: int
    n_embd: int
    context: int
    batch: int
    vocab: int


SHAPES = {
    "large": Shape(n_layer=6, n_head=6, n_embd=384, context=256, batch=8, vocab=4096),
    "baby": Shape(n_layer=4, n_head=4, n_embd=128, context=64, batch=12, vocab=65),
}


def gpt2_flops_per_token(s: Shape) -> float:
    """6N + 12·L·D·T, N = non-embedding matmul weights (12·L·D²) + the LM head (D·V)."""
    n = 12 * s.n_layer * s.n_embd**2 + s.n_embd * s.vocab
    return 6 * n + 12 * s.n_layer * s.n_embd * s.context


def decoder_config(s: Shape) -> TransformerConfig:
    return TransformerConfig(
        vocab_size=s.vocab,
        n_layer=s.n_layer,
        n_head=s.n_head,
        n_embd=s.n_embd,
        max_seq_len=s.context,
    )


def gpt2_step(s: Shape, bf16: bool) -> common.Step:
    model = common.hf_gpt2(
        vocab=s.vocab, context=s.context, n_layer=s.n_layer, n_head=s.n_head, n_embd=s.n_embd
    )
    model.train()
    optimizer = common.peer_adamw(model.parameters(), lr=1e-3)

    def step(x: torch.Tensor, y: torch.Tensor, i: int) -> None:
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.reshape(-1, s.vocab).float(), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    p = common.base_parser(__doc__)
    p.add_argument("--shapes", default="large,baby", help="comma-separated: large,baby")
    args, _inductor_dir = common.throughput_args(p)

    results = {}
    for name in args.shapes.split(","):
        s = SHAPES[name]
        print(f"== {name}: {s}", flush=True)
        g = torch.Generator().manual_seed(args.seed)
        data = torch.randint(0, s.vocab, (s.batch, s.context + 1), generator=g)
        x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
        # Ours and the peer's alternate, so slow phases of a shared machine hit both.
        cfg = decoder_config(s)
        steps = {
            "lmforge_eager": common.lmforge_step(Decoder(cfg), compiled=False),
            "hf_fp32": gpt2_step(s, bf16=False),
        }
        if not args.no_compile:
            steps["lmforge_compile"] = common.lmforge_step(Decoder(cfg), compiled=True)
        steps["hf_bf16"] = gpt2_step(s, bf16=True)
        tokens = s.batch * s.context
        batches = [(x, y)] * (args.warmup + args.steps)  # the same batch at every step
        times, first_step_s = common.time_variants(steps, batches, args, tokens)

        flops_ours = decoder_flops_per_token(cfg, s.context)
        metrics = common.per_token_metrics(tokens, flops_ours, gpt2_flops_per_token(s))
        results[name] = common.throughput_result(
            times, first_step_s, metrics, TARGET, shape=s.__dict__
        )

    target = f"lmforge best >= {TARGET}x peer best tokens/s at every shape"
    common.write_throughput("train_throughput", args, target, results)
    rows = [row for name, res in results.items() for row in common.throughput_rows(res, [name])]
    print(common.table(["shape", "variant", "tok/s", "MFU", "step s"], rows))


if __name__ == "__main__":
    main()
