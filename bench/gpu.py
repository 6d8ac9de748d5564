"""On one CUDA GPU: training tokens/s and MFU, and batch-16 sampling tokens/s, lmforge vs HF.

Run on a machine with a CUDA GPU (it refuses to run without one):

    python bench/gpu.py [--quick] [--repeats 3] [--peak-tflops 989]

Training (GPT-2-small class: 12 layers, 12 heads, 768 wide, context 1024, batch 16, vocab
50,304; bf16 autocast, fp32 master weights): one full optimizer step (forward, loss, backward,
clip 1.0, AdamW, zero_grad) on random tokens, timed with `torch.cuda.synchronize()`.
- lmforge: `Decoder(TransformerConfig(...))`, `build_optimizer(model, OptimConfig())` and
  `train_step` exactly as `lmforge pretrain` runs them (autocast dtype from
  `autocast_dtype("auto", cuda)`); eager and `torch.compile(model)`.
- peer: `transformers.GPT2LMHeadModel` (its default attention, SDPA), dropout 0, plain loop
  (float32 cross-entropy, clip 1.0, AdamW fused), under `torch.autocast("cuda", bfloat16)`;
  eager and `torch.compile(model)`.
MFU = tokens/s x training FLOPs per token / peak (`--peak-tflops`, default 989: the dense bf16
peak of an H100/H200 SXM). FLOPs per token: `decoder_flops_per_token` for ours, 6N + 12·L·D·T
for GPT-2 (N its matmul weights and LM head). The two models differ in their blocks (ours:
RMSNorm, RoPE, SwiGLU; GPT-2: LayerNorm, learned positions, GELU MLP), so MFU is the fair
comparison and tokens/s the practical one.

Sampling: 16 world chat prompts, 64 new tokens at temperature 1 (no end id), bf16 weights,
lmforge `generate` vs `LlamaForCausalLM.generate` holding the same weights, at the default
world shape (4 layers, 128 wide) and a 12-layer 768-wide one.

Timing: per variant `--warmup` untimed steps (compile included; the first step's excess over a
typical one is reported as compile time) then `--steps` timed, repeated `--repeats` times
interleaved; medians. Results: bench/results/gpu.json (`--quick`: gpu_quick.json).
"""

from __future__ import annotations

import time
from typing import Any

import _common as common
import torch
import torch.nn.functional as F

from lmforge.generation.generate import SamplingConfig, generate
from lmforge.models.decoder import Decoder
from lmforge.models.transformer import TransformerConfig
from lmforge.runtime import autocast_dtype
from lmforge.training.loop import train_step
from lmforge.training.metrics import decoder_flops_per_token
from lmforge.training.optim import OptimConfig, build_optimizer

L, H, D, T, B, V = 12, 12, 768, 1024, 16, 50304
CUDA = torch.device("cuda")


def smoke_on_cpu() -> None:
    """`--cpu-smoke`: a tiny shape on the CPU, to check this script runs before a GPU is lent."""
    global L, H, D, T, B, V, CUDA
    L, H, D, T, B, V, CUDA = 2, 2, 64, 64, 4, 512, torch.device("cpu")


def gpt2_flops_per_token() -> float:
    return 6 * (12 * L * D**2 + D * V) + 12 * L * D * T


def ours_step(compiled: bool) -> Any:
    cfg = TransformerConfig(vocab_size=V, n_layer=L, n_head=H, n_embd=D, max_seq_len=T)
    model = Decoder(cfg).to(CUDA).train()
    optimizer = build_optimizer(model, OptimConfig())
    dtype = autocast_dtype("auto", CUDA)
    fwd = torch.compile(model) if compiled else model
    from lmforge.objectives.lm import token_loss

    def step(x: torch.Tensor, y: torch.Tensor, i: int) -> None:
        train_step(
            model, optimizer, [(x, y)], token_loss, n_micro=1, device=CUDA, dtype=dtype,
            grad_clip=1.0, step=i, forward=fwd,
        )  # fmt: skip

    return step, cfg


def peer_step(compiled: bool) -> Any:
    model = common.hf_gpt2(vocab=V, context=T, n_layer=L, n_head=H, n_embd=D).to(CUDA).train()
    optimizer = common.peer_adamw(model.parameters(), lr=1e-3)
    fwd = torch.compile(model) if compiled else model

    def step(x: torch.Tensor, y: torch.Tensor, i: int) -> None:
        with torch.autocast(CUDA.type, torch.bfloat16):
            logits = fwd(input_ids=x).logits
        loss = F.cross_entropy(logits.reshape(-1, V).float(), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def sync() -> None:
    if CUDA.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Any, *a: Any) -> float:
    sync()
    t0 = time.perf_counter()
    fn(*a)
    sync()
    return time.perf_counter() - t0


def training(args: Any) -> dict[str, Any]:
    g = torch.Generator().manual_seed(args.seed)
    data = torch.randint(0, V, (B, T + 1), generator=g).to(CUDA)
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    steps: dict[str, Any] = {}
    first: dict[str, float] = {}
    times: dict[str, list[float]] = {}
    cfg = None
    for compiled in (False, True):
        tag = "compile" if compiled else "eager"
        steps[f"lmforge_{tag}"], cfg = ours_step(compiled)
        steps[f"hf_{tag}"] = peer_step(compiled)
    for r in range(args.repeats):
        for v, step in steps.items():
            for i in range(args.warmup):
                t = timed(step, x, y, i)
                if r == 0 and i == 0:
                    first[v] = t
            times.setdefault(v, []).extend(
                timed(step, x, y, args.warmup + i) for i in range(args.steps)
            )
            print(f"  repeat {r + 1} {v}: {B * T / common.median(times[v]):,.0f} tok/s", flush=True)
    assert cfg is not None
    peak = args.peak_tflops * 1e12
    out: dict[str, Any] = {}
    for v, ts in times.items():
        med = common.median(ts)
        ours = v.startswith("lmforge")
        flops = decoder_flops_per_token(cfg, T) if ours else gpt2_flops_per_token()
        out[v] = {
            "step_s_median": med,
            "step_s_raw": ts,
            "tokens_per_s": B * T / med,
            "flops_per_token": flops,
            "mfu": B * T / med * flops / peak,
            "first_step_s": first[v],
            "compile_s": first[v] - med if v.endswith("compile") else None,
        }
    best = {
        side: max((v for v in out if v.startswith(side)), key=lambda v: out[v]["tokens_per_s"])
        for side in ("lmforge", "hf")
    }
    lm, hf = out[best["lmforge"]], out[best["hf"]]
    return {
        "shape": {"n_layer": L, "n_head": H, "n_embd": D, "context": T, "batch": B, "vocab": V},
        "params_lmforge": sum(p.numel() for p in Decoder(cfg).parameters()),
        "variants": out,
        "best": best,
        "ratio_tokens_per_s": lm["tokens_per_s"] / hf["tokens_per_s"],
        "ratio_mfu": lm["mfu"] / hf["mfu"],
    }


def sampling(args: Any) -> dict[str, Any]:
    import sampling as cpu_sampling  # bench/sampling.py: the same prompts and peer call

    tok = common.world_tokenizer(args.seed)
    prompts = cpu_sampling.world_prompts(tok, args.seed, 16)
    ids, mask = cpu_sampling.left_pad(prompts)
    ids, mask = ids.to(CUDA), mask.to(CUDA)
    n = 8 if args.quick else 64
    results = {}
    for name, shape in {"default": {}, "12L_768": {"n_layer": L, "n_head": H, "n_embd": D}}.items():
        torch.manual_seed(args.seed)
        ours = Decoder(TransformerConfig(vocab_size=tok.vocab_size, **shape)).eval()
        hf = common.llama_from_decoder(ours).to(CUDA, torch.bfloat16).eval()
        ours = ours.to(CUDA, torch.bfloat16)

        def run_ours(seed: int, ours: Decoder = ours) -> None:
            cfg = SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=n, seed=seed)
            generate(ours, prompts, cfg, eos_id=None, pad_id=0)

        def run_hf(seed: int, hf: Any = hf) -> None:
            torch.manual_seed(seed)
            hf.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                top_p=1.0, max_new_tokens=n, min_new_tokens=n, pad_token_id=0, eos_token_id=None,
            )  # fmt: skip

        runs = {"lmforge": run_ours, "hf": run_hf}
        raw: dict[str, list[float]] = {v: [] for v in runs}
        for fn in runs.values():
            timed(fn, 0)  # warm-up
        for r in range(max(args.repeats, 3)):
            for v, fn in runs.items():
                raw[v].append(timed(fn, r + 1))
        tps = {v: 16 * n / common.median(t) for v, t in raw.items()}
        results[name] = {"shape": shape, "raw_s": raw, "new_tokens_per_s": tps,
                         "ratio": tps["lmforge"] / tps["hf"]}  # fmt: skip
        print(f"  sampling {name}: {tps} ratio {tps['lmforge'] / tps['hf']:.2f}x", flush=True)
    return results


def main() -> None:
    p = common.base_parser(__doc__)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--skip", default="", help="comma-separated: training,sampling")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (a check)")
    args = p.parse_args()
    if args.cpu_smoke:
        smoke_on_cpu()
    elif not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs a CUDA GPU")
    if args.quick:
        args.steps, args.warmup, args.repeats = 3, 2, 1
    common.setup(args.threads, args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    payload: dict[str, Any] = {
        "benchmark": "gpu",
        "quick": args.quick,
        "machine": common.machine_info(),
        "gpu": torch.cuda.get_device_name() if CUDA.type == "cuda" else "none (--cpu-smoke)",
        "settings": vars(args),
    }
    path = common.result_path("gpu", args.quick or args.cpu_smoke)
    for part, fn in (("training", training), ("sampling", sampling)):
        if part in args.skip.split(","):
            continue
        print(f"== {part}", flush=True)
        try:
            payload[part] = fn(args)
        except Exception as e:  # keep what the other part measured
            payload[part] = {"error": f"{type(e).__name__}: {e}"}
            print(f"  {part} failed: {e!r}", flush=True)
        common.write_json(path, payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
