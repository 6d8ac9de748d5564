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

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import _common as common
import torch
import torch.nn.functional as F

from lmforge.models.decoder import Decoder
from lmforge.models.transformer import TransformerConfig
from lmforge.objectives.lm import token_loss
from lmforge.runtime import autocast_dtype
from lmforge.training.loop import train_step
from lmforge.training.metrics import decoder_flops_per_token
from lmforge.training.optim import OptimConfig, build_optimizer

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


def lmforge_step(s: Shape, compiled: bool) -> Callable[[torch.Tensor, torch.Tensor, int], None]:
    device = torch.device("cpu")
    model = Decoder(decoder_config(s)).to(device)
    optimizer = build_optimizer(model, OptimConfig())
    dtype = autocast_dtype("auto", device)
    fwd = torch.compile(model) if compiled else model
    model.train()

    def step(x: torch.Tensor, y: torch.Tensor, i: int) -> None:
        train_step(
            model,
            optimizer,
            [(x, y)],
            token_loss,
            n_micro=1,
            device=device,
            dtype=dtype,
            grad_clip=1.0,
            step=i,
            forward=fwd,
        )

    return step


def gpt2_step(s: Shape, bf16: bool) -> Callable[[torch.Tensor, torch.Tensor, int], None]:
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
    p.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per repeat")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    p.add_argument("--keep-inductor-cache", action="store_true", help="warm torch.compile cache")
    args = p.parse_args()
    if args.quick:
        args.steps, args.warmup, args.repeats = 3, 1, 1
    args.warmup = max(args.warmup, 1)  # the first step of a compiled model is its compile
    common.setup(args.threads, args.seed)
    inductor_dir = tempfile.TemporaryDirectory(prefix="lmforge-bench-")  # removed at exit
    if not args.keep_inductor_cache:  # compile time as a first run on a machine pays it
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_dir.name

    results = {}
    for name in args.shapes.split(","):
        s = SHAPES[name]
        print(f"== {name}: {s}", flush=True)
        g = torch.Generator().manual_seed(args.seed)
        data = torch.randint(0, s.vocab, (s.batch, s.context + 1), generator=g)
        x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
        # Ours and the peer's alternate, so slow phases of a shared machine hit both.
        steps = {
            "lmforge_eager": lmforge_step(s, compiled=False),
            "hf_fp32": gpt2_step(s, bf16=False),
        }
        if not args.no_compile:
            steps["lmforge_compile"] = lmforge_step(s, compiled=True)
        steps["hf_bf16"] = gpt2_step(s, bf16=True)
        order = list(steps)
        times: dict[str, list[list[float]]] = {v: [] for v in order}
        first_step_s = None
        for r in range(args.repeats):
            for v in order:
                for i in range(args.warmup):
                    t0 = time.perf_counter()
                    steps[v](x, y, i)
                    if r == 0 and i == 0 and v == "lmforge_compile":
                        first_step_s = time.perf_counter() - t0
                rep = []
                for i in range(args.steps):
                    t0 = time.perf_counter()
                    steps[v](x, y, i)
                    rep.append(time.perf_counter() - t0)
                times[v].append(rep)
                print(
                    f"  repeat {r + 1} {v}: {s.batch * s.context / common.median(rep):,.0f} tok/s"
                )

        flops_ours = decoder_flops_per_token(decoder_config(s), s.context)
        flops = {
            v: flops_ours if v.startswith("lmforge") else gpt2_flops_per_token(s) for v in order
        }
        out = {}
        for v in order:
            med = common.median([t for rep in times[v] for t in rep])
            tps = s.batch * s.context / med
            out[v] = {
                "step_s_raw": times[v],
                "step_s_median": med,
                "tokens_per_s": tps,
                "flops_per_token": flops[v],
                "mfu": tps * flops[v] / common.CPU_PEAK_FLOPS,
            }
        compile_s = None
        if first_step_s is not None:  # the first step's excess over a typical step
            compile_s = first_step_s - out["lmforge_compile"]["step_s_median"]
        ours = max(out[v]["tokens_per_s"] for v in out if v.startswith("lmforge"))
        peer = max(out["hf_fp32"]["tokens_per_s"], out["hf_bf16"]["tokens_per_s"])
        results[name] = {
            "shape": s.__dict__,
            "lmforge_autocast": str(autocast_dtype("auto", torch.device("cpu"))),
            "compile_s": compile_s,
            "compile_first_step_s": first_step_s,
            "variants": out,
            "lmforge_best_tokens_per_s": ours,
            "peer_best_tokens_per_s": peer,
            "ratio": ours / peer,
            "target_ratio": TARGET,
            "meets_target": ours / peer >= TARGET,
        }

    payload = {
        "benchmark": "train_throughput",
        "quick": args.quick,
        "machine": common.machine_info(),
        "settings": vars(args),
        "target": f"lmforge best >= {TARGET}x peer best tokens/s at every shape",
        "results": results,
    }
    common.write_json(common.result_path("train_throughput", args.quick), payload)
    rows = []
    for name, res in results.items():
        for v, o in res["variants"].items():
            rows.append(
                [name, v, o["tokens_per_s"], f"{o['mfu']:.1%}", f"{o['step_s_median']:.4f}"]
            )
        rows.append([name, "ratio best/best", f"{res['ratio']:.2f}x", f"target {TARGET}x", ""])
        if res["compile_s"] is not None:
            rows.append([name, "compile time", f"{res['compile_s']:.1f} s", "", ""])
    print(common.table(["shape", "variant", "tok/s", "MFU", "step s"], rows))


if __name__ == "__main__":
    main()
