"""SFT throughput (real tokens/s) of lmforge, packed and padded, vs Hugging Face Llama, padded.

Measured: the wall time of one full SFT optimizer step (forward, loss on the reply tokens,
backward, clip 1.0, AdamW step, zero_grad) on the task world's SFT data, reported as real
tokens/s = example tokens in the step / step time, plus the padding share of each layout
(padded slots / all slots of the input). Target (issue): lmforge >= 2x the peer on real
tokens/s, from packing plus faster kernels.

Data, the same for every variant: `sft_records(TaskConfig(), "train")` (3,600 single-turn chats
of the six world tasks), rendered by the chat template with `render_examples(tok, convs, 256)`
(loss on the replies and their end-of-turn), `tok` a BPE tokenizer trained with vocab_size 2048
(the small corpus yields 1,959 entries) on `generate_corpus(WorldConfig(n_docs=5000)).train`.
Step i of every variant trains on the same examples: those of packed step i, i.e.
`RowSampler(examples, 256, "packed", seed).rows(8 * i, 8)` (8 rows of 256 slots). With
`--padded-batch N` the padded variants use fixed batches of N examples from `RowSampler(...,
"padded", seed)` instead. Batches are built before timing (collation time is reported apart,
not in tokens/s).

Real tokens: an example of L ids fills L - 1 input slots (its last id is only a target); real
tokens = the sum of L - 1 over the step's examples, `Examples.slots_in(rows)`, the count the SFT
loop's tokens_per_s uses. Every variant is credited the same count for the same examples.

Variants (interleaved in each repeat):
- `lmforge_packed`: the rows as `lmforge.training.sft` runs them: `collate(..., "packed", 256)`
  -> ((x, positions, block-diagonal mask), y), `Decoder`, `build_optimizer` with SFT's default
  optimizer settings, autocast dtype `autocast_dtype("auto", cpu)`, each step one
  `train_step(model, optimizer, [(x, y)], token_loss, grad_clip=1.0, forward=model_forward(
  model, "packed"))`.
- `lmforge_packed_compile`: the same with `model_forward(torch.compile(model), "packed")`
  (compile time = first step minus a typical step, reported apart, not in tokens/s; a cold
  TorchInductor cache unless `--keep-inductor-cache`; `--no-compile` skips it).
- `lmforge_padded`: the same examples one per row, `collate(..., "padded", 256)` -> ((x,), y)
  right-padded to the longest example of the step, plain causal attention.
- `hf_padded_fp32` / `hf_padded_bf16` (the peer): `transformers.LlamaForCausalLM` of the same
  shape (hidden_size, intermediate_size = lmforge's SwiGLU width, heads, kv heads, layers,
  rms_norm_eps, rope_theta, vocab, tied embeddings, no biases, dropout 0, default attention
  implementation = SDPA), the same examples right-padded to the longest of the step, each fed
  its full L ids with labels = the id where the loss mask is set, else -100 (HF shifts them
  itself), attention_mask 0 on padding; plain loop: `model(input_ids, attention_mask,
  labels).loss`, backward, clip_grad_norm_ 1.0, AdamW (fused when available), zero_grad; in
  fp32 and under `torch.autocast("cpu", torch.bfloat16)`. Peer best = the faster of the two.

Shapes: "default" = `TransformerConfig()` defaults (4 layers, 4 heads, 128 wide, context 256);
"large" = 6 layers, 6 heads, 384 wide, context 256 (`--shapes default,large`).
Timing: per repeat and variant `--warmup` untimed steps on batches 0.., then `--steps` timed
steps on the batches after them; a repeat's figure is the timed window's real tokens / its wall
time; the variant's figure is the median over `--repeats` windows.
Results: bench/results/sft_throughput.json (`--quick`: sft_throughput_quick.json).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import _common as common
import numpy as np
import torch

from lmforge.data.instruction import Message
from lmforge.data.masking import IGNORE_INDEX
from lmforge.data.sft_batches import Examples, RowSampler, collate, render_examples
from lmforge.data.world_tasks import TaskConfig, sft_records
from lmforge.models.decoder import Decoder
from lmforge.models.transformer import TransformerConfig
from lmforge.objectives.lm import token_loss
from lmforge.runtime import autocast_dtype
from lmforge.tokenizers import Tokenizer
from lmforge.training.loop import train_step
from lmforge.training.optim import OptimConfig, build_optimizer
from lmforge.training.sft import SFTConfig, model_forward

TARGET = 2.0
BLOCK = 256  # TransformerConfig().max_seq_len: SFT's default block
PACKED_ROWS = 8  # SFTConfig's default train.batch_size
VOCAB = common.WORLD_VOCAB
N_DOCS = common.WORLD_DOCS
COMPILED = "lmforge_packed_compile"
PEERS = ("hf_padded_fp32", "hf_padded_bf16")

SHAPES = {
    "default": {},  # TransformerConfig's defaults
    "large": {"n_layer": 6, "n_head": 6, "n_embd": 384},
}


@dataclass
class Batch:
    """One step's inputs for one variant: the model input, targets, and what they hold."""

    inputs: Any
    targets: Any
    real: int  # example tokens (input slots), the same count for every variant of a step
    slots: int  # all input slots, padding included
    held: int  # input slots that hold example tokens (the peer's: its attention_mask ones)
    n_examples: int


# --- data ---------------------------------------------------------------------------------


def build_examples(seed: int) -> tuple[Tokenizer, Examples, dict[str, Any]]:
    t0 = time.perf_counter()
    tok = common.world_tokenizer(seed)
    records = sft_records(TaskConfig(seed=seed), "train")
    convs = [tuple(Message(m["role"], m["content"]) for m in r["messages"]) for r in records]
    examples = render_examples(tok, convs, BLOCK)
    slots = examples.slots
    info = {
        "source": 'sft_records(TaskConfig(), "train")',
        "tokenizer": f"bpe {VOCAB} on generate_corpus(WorldConfig(n_docs={N_DOCS})).train",
        "tokenizer_vocab_size": tok.vocab_size,
        "n_examples": len(examples),
        "n_truncated": examples.n_truncated,
        "trained_tokens": examples.n_trained,
        "example_slots_mean": float(slots.mean()),
        "example_slots_median": float(np.median(slots)),
        "example_slots_max": int(slots.max()),
        "setup_s": time.perf_counter() - t0,
    }
    return tok, examples, info


def hf_batch(
    examples: Examples, idx: list[int], pad_id: int
) -> tuple[dict[str, torch.Tensor], int]:
    """The peer's inputs for examples `idx`: full ids right-padded to the longest, labels = the
    id where the loss mask is set else -100 (HF shifts them), attention_mask; and the slots."""
    T = max(len(examples.ids[i]) for i in idx)
    ids = torch.full((len(idx), T), pad_id, dtype=torch.long)
    labels = torch.full((len(idx), T), -100, dtype=torch.long)
    attn = torch.zeros((len(idx), T), dtype=torch.long)
    for b, i in enumerate(idx):
        x = torch.from_numpy(examples.ids[i].astype(np.int64))
        m = torch.from_numpy(examples.mask[i])
        ids[b, : len(x)] = x
        labels[b, : len(x)] = torch.where(m, x, -100)
        attn[b, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}, ids.numel()


def build_batches(
    examples: Examples, n: int, seed: int, padded_batch: int, pad_id: int
) -> tuple[dict[str, list[Batch]], dict[str, float]]:
    """n steps of batches per layout (lmforge packed, lmforge padded, peer padded), and the
    mean collation seconds per step of each (not part of the timed steps)."""
    packed_rows = RowSampler(examples, BLOCK, "packed", seed).rows(0, n * PACKED_ROWS)
    padded_sampler = RowSampler(examples, BLOCK, "padded", seed)
    out: dict[str, list[Batch]] = {"packed": [], "padded": [], "hf": []}
    t_collate = {"packed": 0.0, "padded": 0.0, "hf": 0.0}
    for i in range(n):
        rows = packed_rows[i * PACKED_ROWS : (i + 1) * PACKED_ROWS]
        if padded_batch:
            ex_rows = padded_sampler.rows(i * padded_batch, padded_batch)
        else:  # the very examples of packed step i, one per row
            ex_rows = [[j] for r in rows for j in r]
        idx = [r[0] for r in ex_rows]

        t0 = time.perf_counter()
        x, y = collate(examples, rows, "packed", BLOCK)
        t1 = time.perf_counter()
        xp, yp = collate(examples, ex_rows, "padded", BLOCK)
        t2 = time.perf_counter()
        hf, hf_slots = hf_batch(examples, idx, pad_id)
        t3 = time.perf_counter()
        t_collate["packed"] += t1 - t0
        t_collate["padded"] += t2 - t1
        t_collate["hf"] += t3 - t2

        # HF's shift of the labels gives exactly lmforge's padded targets (one more column).
        assert torch.equal(hf["labels"][:, 1:], yp), "peer labels differ from lmforge's targets"
        n_pk, n_pd = sum(len(r) for r in rows), len(idx)
        real_pk, real_pd = examples.slots_in(rows), examples.slots_in(ex_rows)
        if not padded_batch:  # the same examples: the same real tokens and trained targets
            assert real_pk == real_pd
            assert int((y != IGNORE_INDEX).sum()) == int((yp != IGNORE_INDEX).sum())
        out["packed"].append(Batch(x, y, real_pk, y.numel(), real_pk, n_pk))
        out["padded"].append(Batch(xp, yp, real_pd, yp.numel(), real_pd, n_pd))
        held_hf = int(hf["attention_mask"].sum())  # each example's L ids: one more than its slots
        out["hf"].append(Batch(hf, None, real_pd, hf_slots, held_hf, n_pd))
    return out, {k: v / n for k, v in t_collate.items()}


# --- models and steps ---------------------------------------------------------------------


def decoder_config(shape: str, vocab: int) -> TransformerConfig:
    return TransformerConfig(vocab_size=vocab, max_seq_len=BLOCK, **SHAPES[shape])


def sft_optim() -> OptimConfig:
    """SFTConfig's default optimizer settings (lr 1e-3, no weight decay, clip 1.0)."""
    field = {f.name: f for f in dataclasses.fields(SFTConfig)}["optim"]
    return field.default_factory()  # type: ignore[misc]


def lmforge_step(model: Decoder, layout: str, dtype: torch.dtype, compiled: bool) -> Any:
    """A step as `lmforge.training.sft` runs it (grad_accum 1)."""
    device = torch.device("cpu")
    optim = sft_optim()
    optimizer = build_optimizer(model, optim)
    fwd = model_forward(torch.compile(model) if compiled else model, layout)  # type: ignore[arg-type]
    model.train()

    def step(b: Batch, i: int) -> None:
        train_step(
            model,
            optimizer,
            [(b.inputs, b.targets)],
            token_loss,
            n_micro=1,
            device=device,
            dtype=dtype,
            grad_clip=optim.grad_clip,
            step=i + 1,
            forward=fwd,
        )

    return step


def hf_step(model: Any, bf16: bool) -> Any:
    model.train()
    optimizer = common.peer_adamw(model.parameters(), lr=1e-3, weight_decay=0.0)

    def step(b: Batch, i: int) -> None:
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss = model(**b.inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


# --- timing -------------------------------------------------------------------------------


def time_variants(
    steps: dict[str, Any], batches: dict[str, list[Batch]], args: Any
) -> tuple[dict[str, list[list[float]]], float | None]:
    """Per repeat, each variant in turn: `args.warmup` untimed steps, then `args.steps` timed
    ones; returns the timed step seconds per variant and repeat, and the compiled variant's
    first step seconds (its compile) or None."""
    times: dict[str, list[list[float]]] = {v: [] for v in steps}
    first_step_s = None
    timed = range(args.warmup, args.warmup + args.steps)
    for r in range(args.repeats):
        for v, step in steps.items():
            bs = batches[layout_of(v)]
            for i in range(args.warmup):
                t0 = time.perf_counter()
                step(bs[i], i)
                if r == 0 and i == 0 and v == COMPILED:
                    first_step_s = time.perf_counter() - t0
            rep = []
            for i in timed:
                t0 = time.perf_counter()
                step(bs[i], i)
                rep.append(time.perf_counter() - t0)
            times[v].append(rep)
            real = sum(bs[i].real for i in timed)
            print(f"  repeat {r + 1} {v}: {real / sum(rep):,.0f} real tok/s", flush=True)
    return times, first_step_s


def layout_of(variant: str) -> str:
    if variant.startswith("hf"):
        return "hf"
    return "packed" if "packed" in variant else "padded"


def shape_result(
    times: dict[str, list[list[float]]],
    first_step_s: float | None,
    batches: dict[str, list[Batch]],
    args: Any,
    **head: Any,
) -> dict[str, Any]:
    timed = range(args.warmup, args.warmup + args.steps)
    out: dict[str, Any] = {}
    for v, reps in times.items():
        bs = [batches[layout_of(v)][i] for i in timed]
        real = sum(b.real for b in bs)
        slots = sum(b.slots for b in bs)
        held = sum(b.held for b in bs)
        rates = [real / sum(rep) for rep in reps]
        out[v] = {
            "real_tokens_per_s": common.median(rates),
            "real_tokens_per_s_repeats": rates,
            "padding_share": 1 - held / slots,
            "steps_timed": len(bs),
            "repeats": len(reps),
            "examples_per_step": sum(b.n_examples for b in bs) / len(bs),
            "real_tokens_per_step": real / len(bs),
            "slots_per_step": slots / len(bs),
            "step_s_median": common.median([t for rep in reps for t in rep]),
            "step_s_raw": reps,
        }
    peer_name = max(PEERS, key=lambda v: out[v]["real_tokens_per_s"])
    peer = out[peer_name]["real_tokens_per_s"]
    ratios = {f"{v}/peer_best": o["real_tokens_per_s"] / peer for v, o in out.items()}
    ours_name = max(
        (v for v in out if v.startswith("lmforge")), key=lambda v: out[v]["real_tokens_per_s"]
    )
    ours = out[ours_name]["real_tokens_per_s"]
    compile_s = None
    if first_step_s is not None:
        compile_s = first_step_s - out[COMPILED]["step_s_median"]
    return {
        **head,
        "compile_s": compile_s,
        "compile_first_step_s": first_step_s,
        "variants": out,
        "peer_best": peer_name,
        "peer_best_real_tokens_per_s": peer,
        "lmforge_best": ours_name,
        "lmforge_best_real_tokens_per_s": ours,
        "ratios": ratios,
        "ratio": ours / peer,
        "ratio_packed_eager": out["lmforge_packed"]["real_tokens_per_s"] / peer,
        "target_ratio": TARGET,
        "meets_target": ours / peer >= TARGET,
    }


def rows_for(name: str, res: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for v, o in res["variants"].items():
        rows.append(
            [
                name,
                v,
                o["real_tokens_per_s"],
                f"{o['padding_share']:.1%}",
                f"{o['examples_per_step']:.1f}",
                f"{o['real_tokens_per_step']:.0f}",
                o["steps_timed"],
                f"{res['ratios'][f'{v}/peer_best']:.2f}x",
            ]
        )
    best = f"{res['lmforge_best']} / {res['peer_best']}"
    rows.append([name, best, f"{res['ratio']:.2f}x", "", "", "", "", f"target {TARGET}x"])
    if res["compile_s"] is not None:
        rows.append([name, "compile time", f"{res['compile_s']:.1f} s", "", "", "", "", ""])
    return rows


def main() -> None:
    p = common.base_parser(__doc__)
    p.add_argument("--shapes", default="default", help="comma-separated: default,large")
    p.add_argument(
        "--padded-batch",
        type=int,
        default=0,
        help="examples per padded step; 0: the examples of the packed step (same real tokens)",
    )
    args, _inductor_dir = common.throughput_args(p)

    tok, examples, data_info = build_examples(args.seed)
    n_batches = args.warmup + args.steps
    batches, collate_s = build_batches(
        examples, n_batches, args.seed, args.padded_batch, tok.special_ids["pad"]
    )
    data_info["collate_s_per_step"] = collate_s
    print(
        f"data: {len(examples)} examples, mean {data_info['example_slots_mean']:.1f} slots, "
        f"vocab {tok.vocab_size}, setup {data_info['setup_s']:.1f} s",
        flush=True,
    )
    dtype = autocast_dtype("auto", torch.device("cpu"))

    results = {}
    for name in args.shapes.split(","):
        cfg = decoder_config(name, tok.vocab_size)
        print(f"== {name}: {cfg}", flush=True)
        from transformers import LlamaForCausalLM

        torch.manual_seed(args.seed)
        steps: dict[str, Any] = {}
        models: dict[str, torch.nn.Module] = {}
        for v in ("lmforge_packed", *PEERS[:1], "lmforge_padded", COMPILED, *PEERS[1:]):
            if v == COMPILED and args.no_compile:
                continue
            if v.startswith("hf"):
                models[v] = LlamaForCausalLM(common.llama_config(cfg))
                steps[v] = hf_step(models[v], bf16=v.endswith("bf16"))
            else:
                models[v] = Decoder(cfg)
                steps[v] = lmforge_step(models[v], layout_of(v), dtype, v == COMPILED)
        params = {
            "lmforge": common.n_params(models["lmforge_packed"]),
            "hf": common.n_params(models[PEERS[0]]),
        }
        assert params["lmforge"] == params["hf"], f"the shapes differ: {params}"
        times, first_step_s = time_variants(steps, batches, args)
        results[name] = shape_result(
            times,
            first_step_s,
            batches,
            args,
            shape=dataclasses.asdict(cfg),
            params=params,
            block_size=BLOCK,
            packed_rows_per_step=PACKED_ROWS,
            padded_batch=args.padded_batch or "the examples of the packed step",
            lmforge_autocast=str(dtype),
            peer_attn_implementation=models[PEERS[0]].config._attn_implementation,
            data=data_info,
        )

    target = f"lmforge best >= {TARGET}x peer best real tokens/s (packed vs padded peer)"
    common.write_throughput("sft_throughput", args, target, results)
    rows = [row for name, res in results.items() for row in rows_for(name, res)]
    headers = [
        "shape",
        "variant",
        "real tok/s",
        "padding",
        "ex/step",
        "real/step",
        "steps",
        "vs peer",
    ]
    print(common.table(headers, rows))


if __name__ == "__main__":
    main()
