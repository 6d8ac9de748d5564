"""Decoding speed (new tokens/s) with a KV cache: lmforge `generate` vs Hugging Face GPT-2.

Measured: the wall time of one whole greedy generation call of `--new-tokens` (default 256) new
tokens from a 32-token random prompt, reported as new tokens/s = batch * new tokens / median
call time, at batch 1 and 8, in fp32 and in bf16 (both models cast with `.to(torch.bfloat16)`).
Each call must return exactly `--new-tokens` tokens per row (checked; nothing stops early).

lmforge: `generate(model, prompts, SamplingConfig(max_new_tokens=256, temperature=0),
eos_id=None)` on `Decoder(TransformerConfig(6 layers, 6 heads, 384 wide, vocab 4096,
max_seq_len=512))`.
Peer: `transformers.GPT2LMHeadModel` of the same shape (n_positions 512), `model.generate(
input_ids, attention_mask, max_new_tokens=256, min_new_tokens=256, do_sample=False,
use_cache=True, eos_token_id=None, pad_token_id=0)`.
Both random-init (speed only), eval mode, same prompts.

Timing: one untimed warm-up call per configuration, then `--repeats` timed calls, interleaved
ours / peer. Reported: tokens/s per (dtype, batch, model), the ratio lmforge/peer in the same
dtype, and per batch the best-vs-best ratio (each side's faster dtype).
Target (issue): lmforge >= 2x the peer. Data: none.
Results: bench/results/generation.json.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from _common import (
    base_parser,
    hf_gpt2,
    machine_info,
    median,
    result_path,
    setup,
    table,
    write_json,
)

from lmforge.generation.generate import SamplingConfig, generate
from lmforge.models.decoder import Decoder
from lmforge.models.transformer import TransformerConfig

TARGET = 2.0
SHAPE = dict(n_layer=6, n_head=6, n_embd=384, vocab=4096, context=512)
PROMPT_LEN = 32
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

Runner = Callable[[torch.Tensor], torch.Tensor]  # prompts (B, P) -> new tokens (B, N)


def lmforge_runner(dtype: torch.dtype, new_tokens: int) -> Runner:
    cfg = TransformerConfig(
        vocab_size=SHAPE["vocab"],
        n_layer=SHAPE["n_layer"],
        n_head=SHAPE["n_head"],
        n_embd=SHAPE["n_embd"],
        max_seq_len=SHAPE["context"],
    )
    model = Decoder(cfg).to(dtype).eval()
    sampling = SamplingConfig(max_new_tokens=new_tokens, temperature=0.0)

    def run(prompts: torch.Tensor) -> torch.Tensor:
        return torch.tensor(generate(model, prompts.tolist(), sampling, eos_id=None))

    return run


def hf_runner(dtype: torch.dtype, new_tokens: int) -> Runner:
    model = hf_gpt2(
        vocab=SHAPE["vocab"],
        context=SHAPE["context"],
        n_layer=SHAPE["n_layer"],
        n_head=SHAPE["n_head"],
        n_embd=SHAPE["n_embd"],
    )
    model = model.to(dtype).eval()

    def run(prompts: torch.Tensor) -> torch.Tensor:
        out = model.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            eos_token_id=None,
            pad_token_id=0,
        )
        return out[:, prompts.size(1) :]

    return run


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--new-tokens", type=int, default=256, help="tokens generated per call")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    args = p.parse_args()
    if args.quick:
        args.new_tokens, args.repeats = 16, 1
    setup(args.threads, args.seed)
    batches = [int(b) for b in args.batches.split(",")]

    g = torch.Generator().manual_seed(args.seed)
    prompts = {b: torch.randint(0, SHAPE["vocab"], (b, PROMPT_LEN), generator=g) for b in batches}
    raw: dict[str, dict[str, list[float]]] = {}
    for dname, dtype in DTYPES.items():
        torch.manual_seed(args.seed)
        runners = {
            "lmforge": lmforge_runner(dtype, args.new_tokens),
            "hf": hf_runner(dtype, args.new_tokens),
        }
        for b in batches:
            key = f"{dname}/b{b}"
            raw[key] = {m: [] for m in runners}
            for m, run in runners.items():  # warm-up, and check the output length
                new = run(prompts[b])
                if tuple(new.shape) != (b, args.new_tokens):
                    raise SystemExit(f"{m} {key}: got {tuple(new.shape)} new tokens")
            for _ in range(args.repeats):
                for m, run in runners.items():
                    t0 = time.perf_counter()
                    run(prompts[b])
                    raw[key][m].append(time.perf_counter() - t0)
            tps = {m: b * args.new_tokens / median(t) for m, t in raw[key].items()}
            print(f"  {key}: " + ", ".join(f"{m} {v:,.0f} tok/s" for m, v in tps.items()))

    results: dict[str, dict] = {}
    for key, per_model in raw.items():
        b = int(key.split("/b")[1])
        tps = {m: b * args.new_tokens / median(t) for m, t in per_model.items()}
        results[key] = {
            "call_s_raw": per_model,
            "call_s_median": {m: median(t) for m, t in per_model.items()},
            "new_tokens_per_s": tps,
            "ratio": tps["lmforge"] / tps["hf"],
        }
    best = {}
    for b in batches:
        ours = max(results[f"{d}/b{b}"]["new_tokens_per_s"]["lmforge"] for d in DTYPES)
        peer = max(results[f"{d}/b{b}"]["new_tokens_per_s"]["hf"] for d in DTYPES)
        best[f"b{b}"] = {
            "lmforge_best": ours,
            "peer_best": peer,
            "ratio": ours / peer,
            "meets_target": ours / peer >= TARGET,
        }

    payload = {
        "benchmark": "generation",
        "quick": args.quick,
        "machine": machine_info(),
        "settings": {**vars(args), "shape": SHAPE, "prompt_len": PROMPT_LEN},
        "target": f"lmforge >= {TARGET}x peer new tokens/s (best dtype vs best dtype, per batch)",
        "target_ratio": TARGET,
        "results": results,
        "best_vs_best": best,
    }
    write_json(result_path("generation", args.quick), payload)
    rows = [
        [
            key,
            r["new_tokens_per_s"]["lmforge"],
            r["new_tokens_per_s"]["hf"],
            f"{r['ratio']:.2f}x",
        ]
        for key, r in results.items()
    ]
    rows += [
        [f"best {k}", v["lmforge_best"], v["peer_best"], f"{v['ratio']:.2f}x"]
        for k, v in best.items()
    ]
    print(table(["dtype/batch", "lmforge tok/s", "hf tok/s", "ratio"], rows))
    print(f"target: >= {TARGET}x")


if __name__ == "__main__":
    main()
