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

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import _common as common
import torch

from lmforge.data.masking import MaskingConfig, mask_tokens
from lmforge.models.encoder import Encoder
from lmforge.models.transformer import TransformerConfig
from lmforge.objectives.lm import token_loss
from lmforge.runtime import autocast_dtype
from lmforge.training.loop import train_step
from lmforge.training.metrics import decoder_flops_per_token
from lmforge.training.optim import OptimConfig, build_optimizer

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


def lmforge_step(s: Shape, compiled: bool) -> Callable[[torch.Tensor, torch.Tensor, int], None]:
    device = torch.device("cpu")
    model = Encoder(encoder_config(s)).to(device)
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


def bert_step(s: Shape, bf16: bool) -> Callable[[torch.Tensor, torch.Tensor, int], None]:
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
    p = common.base_parser(__doc__)
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

    s = SHAPE
    print(f"== encoder: {s}", flush=True)
    # Masking is data preparation, not part of a step: done once, outside the timed region.
    batches = masked_batches(s, args.warmup + args.steps, args.seed)
    selected = [int((y != -100).sum()) for _, y in batches]
    # Ours and the peer's alternate, so slow phases of a shared machine hit both.
    steps = {
        "lmforge_eager": lmforge_step(s, compiled=False),
        "hf_fp32": bert_step(s, bf16=False),
    }
    if not args.no_compile:
        steps["lmforge_compile"] = lmforge_step(s, compiled=True)
    steps["hf_bf16"] = bert_step(s, bf16=True)
    order = list(steps)
    times: dict[str, list[list[float]]] = {v: [] for v in order}
    first_step_s = None
    for r in range(args.repeats):
        for v in order:
            for i in range(args.warmup):
                x, y = batches[i]
                t0 = time.perf_counter()
                steps[v](x, y, i)
                if r == 0 and i == 0 and v == "lmforge_compile":
                    first_step_s = time.perf_counter() - t0
            rep = []
            for i in range(args.warmup, args.warmup + args.steps):
                x, y = batches[i]
                t0 = time.perf_counter()
                steps[v](x, y, i)
                rep.append(time.perf_counter() - t0)
            times[v].append(rep)
            print(f"  repeat {r + 1} {v}: {s.batch * s.context / common.median(rep):,.0f} tok/s")

    flops_ours = decoder_flops_per_token(encoder_config(s), s.context)
    flops = {v: flops_ours if v.startswith("lmforge") else bert_flops_per_token(s) for v in order}
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
    result = {
        "shape": s.__dict__,
        "masking": {
            **MaskingConfig().__dict__,
            "mask_id": MASK_ID,
            "n_special": N_SPECIAL,
            "mask_seed": "step index i",
            "selected_per_batch": selected,
        },
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
        "benchmark": "encoder_throughput",
        "quick": args.quick,
        "machine": common.machine_info(),
        "settings": vars(args),
        "target": f"lmforge encoder best >= {TARGET}x BertForMaskedLM best tokens/s",
        "results": {"encoder": result},
    }
    common.write_json(common.result_path("encoder_throughput", args.quick), payload)
    rows = []
    for v, o in out.items():
        rows.append([v, o["tokens_per_s"], f"{o['mfu']:.1%}", f"{o['step_s_median']:.4f}"])
    rows.append(["ratio best/best", f"{result['ratio']:.2f}x", f"target {TARGET}x", ""])
    if compile_s is not None:
        rows.append(["compile time", f"{compile_s:.1f} s", "", ""])
    print(common.table(["variant", "tok/s", "MFU", "step s"], rows))


if __name__ == "__main__":
    main()
