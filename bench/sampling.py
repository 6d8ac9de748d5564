"""Sampling speed (new tokens/s) at batch 16: lmforge `generate` vs Hugging Face Llama generate.

Measured: the wall time of one whole sampling call (prefill of the left-padded prompts, then
`--new-tokens` (default 64) KV-cached decoding steps at temperature 1, top-p 1, no top-k),
reported as new tokens/s = batch * new tokens / median call time. No end-of-sequence id is
given, so every row generates exactly `--new-tokens` tokens (checked). Target (issue): lmforge
>= 2x the peer at batch 16.

Prompts, the same for both: the first `--batch` (16) prompts of `make_splits(TaskConfig())
["train"]` (round-robin over the six world tasks, so of different lengths), each rendered by
`render_chat(tok, [Message("user", prompt)], add_generation_prompt=True)`, `tok` the world BPE
tokenizer (2,048 requested, on `generate_corpus(WorldConfig(n_docs=5000)).train`); left-padded
with 0 (`<|pad|>`) to the longest.

Models, the same function: `Decoder(TransformerConfig(vocab_size=tok.vocab_size, **shape))`,
random init, eval mode, and `transformers.LlamaForCausalLM` (`llama_config` of
bench/_common.py) holding a copy of its weights (`llama_from_decoder`; the logits of one prompt
are checked equal, and the share of greedy tokens both pick for the padded batch is recorded).

- lmforge: `generate(model, prompts, SamplingConfig(temperature=1.0, top_p=1.0,
  max_new_tokens=N, seed=s), eos_id=None, pad_id=0)` (it left-pads the lists itself).
- peer: `model.generate(input_ids, attention_mask, do_sample=True, temperature=1.0, top_k=0,
  top_p=1.0, max_new_tokens=N, min_new_tokens=N, pad_token_id=0, eos_token_id=None)` (KV cache,
  positions from the attention mask); `torch.manual_seed(s)` before each call.

Precisions, each model in each (`--dtypes`): `fp32`; `bf16_autocast`, the fp32 model called
under `torch.autocast("cpu", torch.bfloat16)`; `bf16_weights`, a copy cast with
`.to(torch.bfloat16)`. Each side is credited its best precision (peer best = its fastest).

Shapes (`--shapes`): "default" = `TransformerConfig()` (4 layers, 4 heads, 128 wide, context
256) and "large" = 6 layers, 6 heads, 384 wide, context 256.
Timing: per shape one untimed warm-up call per variant, then `--repeats` (5) timed calls per
variant, interleaved (every variant once per round). Reported per variant tokens/s of the
median call, the same-precision ratio lmforge/peer, and best vs best.
Results: bench/results/sampling.json (`--quick`: 8 new tokens, 1 repeat, sampling_quick.json).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import _common as common
import torch

from lmforge.data.instruction import Message
from lmforge.data.world_tasks import TaskConfig, make_splits
from lmforge.generation.generate import SamplingConfig, generate
from lmforge.models.decoder import Decoder
from lmforge.models.transformer import TransformerConfig
from lmforge.tokenizers import Tokenizer
from lmforge.tokenizers.chat import render_chat

TARGET = 2.0
PAD = 0  # lmforge's <|pad|>, also the peer's pad_token_id
DTYPES = ("fp32", "bf16_autocast", "bf16_weights")
SHAPES = {
    "default": {},  # TransformerConfig's defaults
    "large": {"n_layer": 6, "n_head": 6, "n_embd": 384},
}

Runner = Callable[[int], torch.Tensor]  # seed -> new tokens (B, N)


def world_prompts(tok: Tokenizer, seed: int, batch: int) -> list[list[int]]:
    examples = make_splits(TaskConfig(seed=seed))["train"][:batch]
    return [
        render_chat(tok, [Message("user", ex.prompt)], add_generation_prompt=True)[0]
        for ex in examples
    ]


def left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask), both (B, P), the prompts right-aligned after PAD."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), PAD, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p) :] = torch.tensor(p)
        mask[i, P - len(p) :] = 1
    return ids, mask


def precision(model: torch.nn.Module, dtype: str) -> tuple[torch.nn.Module, Any]:
    """The model to call and the context to call it in, for one of DTYPES."""
    if dtype == "bf16_weights":
        return copy.deepcopy(model).to(torch.bfloat16).eval(), contextlib.nullcontext
    if dtype == "bf16_autocast":
        return model, lambda: torch.autocast("cpu", torch.bfloat16)
    return model, contextlib.nullcontext


def lmforge_runner(model: Decoder, dtype: str, prompts: list[list[int]], n: int) -> Runner:
    m, ctx = precision(model, dtype)

    def run(seed: int) -> torch.Tensor:
        sampling = SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=n, seed=seed)
        with ctx():
            out = generate(m, prompts, sampling, eos_id=None, pad_id=PAD)  # type: ignore[arg-type]
        return torch.tensor(out)

    return run


def hf_runner(model: Any, dtype: str, prompts: list[list[int]], n: int) -> Runner:
    m, ctx = precision(model, dtype)
    ids, mask = left_pad(prompts)

    def run(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        with ctx():
            out = m.generate(  # type: ignore[operator]
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=n,
                min_new_tokens=n,
                pad_token_id=PAD,
                eos_token_id=None,
            )
        return out[:, ids.size(1) :]

    return run


def same_function(ours: Decoder, hf: Any, prompts: list[list[int]]) -> dict[str, Any]:
    """Check the copied weights: one prompt's logits agree; record how many of 8 greedy tokens
    per row of the left-padded batch both models pick (float rounding may split a near-tie)."""
    with torch.no_grad():
        x = torch.tensor([prompts[0]])
        diff = float((ours(x) - hf(x).logits).abs().max())
    if diff > 1e-3:
        raise SystemExit(f"the peer's copy differs from lmforge's model: max |dlogit| {diff}")
    greedy = torch.tensor(generate(ours, prompts, SamplingConfig(max_new_tokens=8), eos_id=None))
    ids, mask = left_pad(prompts)
    peer = hf.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=8,
        min_new_tokens=8,
        pad_token_id=PAD,
        eos_token_id=None,
    )[:, ids.size(1) :]
    return {"max_abs_logit_diff": diff, "greedy_agreement": float((greedy == peer).float().mean())}


def shape_result(raw: dict[str, list[float]], batch: int, n: int, **head: Any) -> dict[str, Any]:
    out = {
        v: {
            "call_s_raw": t,
            "call_s_median": common.median(t),
            "new_tokens_per_s": batch * n / common.median(t),
        }
        for v, t in raw.items()
    }
    dtypes = [d for d in DTYPES if f"lmforge_{d}" in out]
    same = {
        d: out[f"lmforge_{d}"]["new_tokens_per_s"] / out[f"hf_{d}"]["new_tokens_per_s"]
        for d in dtypes
    }
    ours_name = max((f"lmforge_{d}" for d in dtypes), key=lambda v: out[v]["new_tokens_per_s"])
    peer_name = max((f"hf_{d}" for d in dtypes), key=lambda v: out[v]["new_tokens_per_s"])
    ours, peer = out[ours_name]["new_tokens_per_s"], out[peer_name]["new_tokens_per_s"]
    return {
        **head,
        "variants": out,
        "ratio_same_dtype": same,
        "lmforge_best": ours_name,
        "lmforge_best_new_tokens_per_s": ours,
        "peer_best": peer_name,
        "peer_best_new_tokens_per_s": peer,
        "ratio": ours / peer,
        "target_ratio": TARGET,
        "meets_target": ours / peer >= TARGET,
    }


def main() -> None:
    p = common.base_parser(__doc__, default_repeats=5)
    p.add_argument("--new-tokens", type=int, default=64, help="tokens sampled per row")
    p.add_argument("--batch", type=int, default=16, help="prompts per call")
    p.add_argument("--shapes", default="default,large", help="comma-separated: default,large")
    p.add_argument(
        "--dtypes", default=",".join(DTYPES), help="comma-separated: " + ", ".join(DTYPES)
    )
    args = p.parse_args()
    if args.quick:
        args.new_tokens, args.repeats = 8, 1
    common.setup(args.threads, args.seed)
    dtypes = args.dtypes.split(",")
    unknown = set(dtypes) - set(DTYPES)
    if unknown:
        raise SystemExit(f"--dtypes: unknown {', '.join(sorted(unknown))}")

    tok = common.world_tokenizer(args.seed)
    prompts = world_prompts(tok, args.seed, args.batch)
    lengths = [len(x) for x in prompts]
    print(f"prompts: {len(prompts)}, {min(lengths)}..{max(lengths)} tokens", flush=True)

    results = {}
    for name in args.shapes.split(","):
        cfg = TransformerConfig(vocab_size=tok.vocab_size, **SHAPES[name])
        print(f"== {name}: {cfg}", flush=True)
        torch.manual_seed(args.seed)
        ours = Decoder(cfg).eval()
        hf = common.llama_from_decoder(ours).eval()
        check = same_function(ours, hf, prompts)
        runners: dict[str, Runner] = {}
        for d in dtypes:
            runners[f"lmforge_{d}"] = lmforge_runner(ours, d, prompts, args.new_tokens)
            runners[f"hf_{d}"] = hf_runner(hf, d, prompts, args.new_tokens)
        for v, run in runners.items():  # warm-up, and check every row got N tokens
            new = run(args.seed)
            if tuple(new.shape) != (len(prompts), args.new_tokens):
                raise SystemExit(f"{name} {v}: got {tuple(new.shape)} new tokens")
        raw: dict[str, list[float]] = {v: [] for v in runners}
        for r in range(args.repeats):
            for v, run in runners.items():
                t0 = time.perf_counter()
                run(args.seed + 1 + r)
                raw[v].append(time.perf_counter() - t0)
        results[name] = shape_result(
            raw,
            len(prompts),
            args.new_tokens,
            shape=dataclasses.asdict(cfg),
            params=common.n_params(ours),
            prompt_lengths=lengths,
            padded_prompt_length=max(lengths),
            peer_attn_implementation=hf.config._attn_implementation,
            weights_check=check,
        )
        res = results[name]
        print(
            "  "
            + ", ".join(f"{v} {o['new_tokens_per_s']:,.0f}" for v, o in res["variants"].items())
            + f" tok/s; best/best {res['ratio']:.2f}x",
            flush=True,
        )

    payload = {
        "benchmark": "sampling",
        "quick": args.quick,
        "machine": common.machine_info(),
        "settings": vars(args),
        "target": f"lmforge >= {TARGET}x peer new tokens/s at batch {args.batch} (best vs best)",
        "results": results,
    }
    common.write_json(common.result_path("sampling", args.quick), payload)
    rows = []
    for name, res in results.items():
        for d in dtypes:
            o = res["variants"]
            rows.append(
                [
                    name,
                    d,
                    o[f"lmforge_{d}"]["new_tokens_per_s"],
                    o[f"hf_{d}"]["new_tokens_per_s"],
                    f"{res['ratio_same_dtype'][d]:.2f}x",
                ]
            )
        best = f"best: {res['lmforge_best']} / {res['peer_best']}"
        rows.append(
            [
                name,
                best,
                res["lmforge_best_new_tokens_per_s"],
                res["peer_best_new_tokens_per_s"],
                f"{res['ratio']:.2f}x",
            ]
        )
    print(common.table(["shape", "dtype", "lmforge tok/s", "hf tok/s", "ratio"], rows))
    print(f"target: >= {TARGET}x")


if __name__ == "__main__":
    main()
