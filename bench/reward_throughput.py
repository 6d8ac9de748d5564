"""Reward-model training throughput (pairs/s) of lmforge vs Hugging Face Llama sequence scoring.

Measured: the wall time of one reward-model optimizer step on B = 16 preference pairs (one
forward over the 2B right-padded chosen and rejected sequences, Bradley-Terry loss, backward,
clip 1.0, AdamW step, zero_grad), reported as pairs/s = pairs in the timed steps / their wall
time, and as real tokens/s (the sequences' tokens, padding excluded). Target (issue): lmforge
>= 2x the peer on pairs/s.

Data, the same for every variant, built without a trained policy: for each of the 3,600
`make_splits(TaskConfig())["train"]` world prompts, four responses: the canonical answer and
`FLAWS["wrong"]`, `FLAWS["rambling"]`, `FLAWS["impolite"]` (one seeded `random.Random`), as
responses.jsonl records ({"id", "messages": [user prompt], "responses", "task", "answer"});
labelled by `label_simulated(records, Annotator(noise=0.1))` (every pair of the four judged
once: 6 pairs per prompt, 21,600 in all, the chosen side drawn by the noisy Bradley-Terry
annotator) and read back with `parse_preference` (lmforge's preference-file reader) into
`Preference`s. Step i takes the pairs `epoch_order(n, seed, 16 i, 16)` (the reward loop's seeded
order), rendered with `render_pairs(tok, prefs, 256)` (prompt + reply + `<|end_of_turn|>`) and
batched by `collate_pairs` -> ((ids (2B, T), last (2B,), ...), labels (B,)), right-padded with 0
to the step's longest sequence (for `lmforge_packed`: packed into rows of 256); `tok` the
world BPE tokenizer (2,048 requested, on `generate_corpus(WorldConfig(n_docs=5000)).train`).
Batches are built before timing.

Variants (interleaved in each repeat):
- `lmforge_eager`: `RewardModel(Decoder(cfg))` (a linear head on the final hidden state of each
  sequence's last real token: the peer's model; the reward stage's optional likelihood term is
  off here, as the peer has none), `build_optimizer(model, OptimConfig(lr=3e-4, weight_decay=0))`,
  autocast dtype `autocast_dtype("auto", cpu)`, each step one `train_step(model, optimizer,
  [(x, y)], pair_loss(margin=0.0), grad_clip=1.0)`: as `lmforge.training.reward` runs it
  (less its per-step learning-rate schedule; the reward command has no compile option).
- `lmforge_packed`: the same, on the same pairs packed into rows of 256 tokens (block-diagonal
  mask, positions restarting per sequence): the reward stage's default layout, no padding.
- `lmforge_compile`: `lmforge_eager` with `forward=torch.compile(model, dynamic=True)` (T
  changes from step to step; dynamic shapes avoid a compile per length). Compile time = first
  step minus a typical step, reported apart; a cold TorchInductor cache unless
  `--keep-inductor-cache`; `--no-compile` skips it. Recompiles (TorchInductor's CPU size
  heuristics) can still fall in the timed steps and count there; dynamo's graph-break and graph
  counts are recorded (`compile_dynamo`).
- `hf_fp32` / `hf_bf16` (the peer): `transformers.LlamaForSequenceClassification` (what
  `AutoModelForSequenceClassification` builds for a Llama config) of the same shape
  (`llama_config` of bench/_common.py, num_labels 1, pad_token_id 0 so it scores the last
  non-pad token; same parameters less the head's bias, checked), fed the same ids with
  attention_mask (built before timing); plain loop: `model(input_ids, attention_mask).logits`,
  loss -logsigmoid(r_chosen - r_rejected).mean() (lmforge's loss at label 1, which every
  simulated label is, checked), backward, clip_grad_norm_ 1.0, AdamW lr 3e-4 (fused when
  available), zero_grad; in fp32 and under `torch.autocast("cpu", torch.bfloat16)`. Peer
  best = the faster of the two.

Shapes: "default" = `TransformerConfig()` (4 layers, 4 heads, 128 wide, context 256); "large"
= 6 layers, 6 heads, 384 wide (`--shapes default,large`). Random init: speed only.
Timing: per repeat and variant `--warmup` untimed steps on batches 0.., then `--steps` timed
steps on the batches after them; a repeat's figure is the timed window's pairs / its wall time,
a variant's the median over `--repeats` windows.
Results: bench/results/reward_throughput.json (`--quick`: reward_throughput_quick.json).
"""

from __future__ import annotations

import dataclasses
import random
import time
from typing import Any

import _common as common
import torch
import torch.nn.functional as F

from lmforge.data.preference import Preference, parse_preference
from lmforge.data.world import World
from lmforge.data.world_tasks import FLAWS, TaskConfig, make_splits
from lmforge.feedback.simulated import Annotator, label_simulated
from lmforge.models.decoder import Decoder
from lmforge.models.reward import RewardModel
from lmforge.models.transformer import TransformerConfig
from lmforge.runtime import autocast_dtype
from lmforge.tokenizers import Tokenizer
from lmforge.training.loop import epoch_order
from lmforge.training.optim import OptimConfig
from lmforge.training.reward import collate_pairs, pair_loss, render_pairs

TARGET = 2.0
PAIRS = 16  # pairs per step: RewardConfig's default train.batch_size
BLOCK = 256  # TransformerConfig().max_seq_len: the reward loop's default block
FLAWED = ("wrong", "rambling", "impolite")  # the responses besides the canonical answer
NOISE = 0.1  # Annotator(noise=...)
OPTIM = OptimConfig(lr=3e-4, weight_decay=0.0)
PEERS = ("hf_fp32", "hf_bf16")
SHAPES = {
    "default": {},  # TransformerConfig's defaults
    "large": {"n_layer": 6, "n_head": 6, "n_embd": 384},
}

Batch = tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]  # ((ids, lengths), labels)


# --- data ---------------------------------------------------------------------------------


def world_preferences(seed: int) -> tuple[list[Preference], dict[str, Any]]:
    """The simulated-annotator pairs of the world's train prompts (see the module docstring)."""
    tasks = TaskConfig(seed=seed)
    world = World.from_seed(tasks.seed)
    rng = random.Random(f"bench-reward:{seed}")
    records = []
    for n, ex in enumerate(make_splits(tasks)["train"]):
        responses = [ex.answer, *(FLAWS[f](ex, rng, world) for f in FLAWED)]
        records.append(
            {
                "id": f"world-train-{n}",
                "messages": [{"role": "user", "content": ex.prompt}],
                "responses": responses,
                "task": ex.task,
                "answer": ex.answer,
            }
        )
    labelled = label_simulated(records, Annotator(noise=NOISE, seed=seed))
    prefs = [p for k, rec in enumerate(labelled) for p in parse_preference(rec, "world", k + 1)]
    answers = {r["id"]: r["answer"] for r in records}
    info = {
        "source": 'make_splits(TaskConfig())["train"], responses answer + FLAWS '
        + ", ".join(FLAWED),
        "annotator": Annotator(noise=NOISE, seed=seed).settings(),
        "n_prompts": len(records),
        "n_pairs": len(prefs),
        "share_answer_chosen": sum(r["chosen"] == answers[r["id"]] for r in labelled)
        / max(1, sum(answers[r["id"]] in (r["chosen"], r["rejected"]) for r in labelled)),
    }
    return prefs, info


def build_batches(
    tok: Tokenizer, prefs: list[Preference], n: int, seed: int
) -> tuple[list[Batch], list[Any], list[torch.Tensor], dict[str, Any]]:
    """n steps of PAIRS pairs in the reward loop's order, each collated as the loop collates
    it, the peer's attention masks for them, and what they hold."""
    order = epoch_order(len(prefs), seed, 0, n * PAIRS)
    t0 = time.perf_counter()
    pairs = render_pairs(tok, [prefs[k] for k in order], BLOCK)
    t1 = time.perf_counter()
    batches = [collate_pairs(pairs, range(i * PAIRS, (i + 1) * PAIRS)) for i in range(n)]
    t2 = time.perf_counter()
    packed = [
        collate_pairs(pairs, range(i * PAIRS, (i + 1) * PAIRS), "packed", BLOCK) for i in range(n)
    ]
    masks = []
    for (ids, last, *_), labels in batches:
        lengths = seq_lengths(ids, last)
        valid = torch.arange(ids.size(1))[None, :] < lengths[:, None]  # (2B, T)
        # The peer scores the rightmost id that is not pad_token_id (0): real ids never are.
        assert bool((ids[valid] != 0).all()) and bool((ids[~valid] == 0).all())
        # The peer's loss is lmforge's at label 1, which every simulated label is.
        assert bool((labels == 1.0).all()), "soft labels: the peer's loss would differ"
        masks.append(valid.long())
    slots = sum(x[0].numel() for x, _ in batches)
    real = sum(real_tokens(b) for b in batches)
    packed_slots = sum(x[0].numel() for x, _ in packed)
    info = {
        "pairs_per_step": PAIRS,
        "steps_built": n,
        "seq_len_mean": real / (2 * PAIRS * n),
        "seq_len_max": max(int(seq_lengths(*x[:2]).max()) for x, _ in batches),
        "padded_len_mean": sum(x[0].size(1) for x, _ in batches) / n,
        "padding_share": 1 - real / slots,
        "packed_padding_share": 1 - real / packed_slots,
        "render_s": t1 - t0,
        "collate_s_per_step": (t2 - t1) / n,
    }
    return batches, packed, masks, info


def seq_lengths(ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Lengths of the right-padded rows of a padded batch, from their last-token indices."""
    return last - torch.arange(ids.size(0)) * ids.size(1) + 1


def real_tokens(batch: Batch) -> int:
    return int(seq_lengths(*batch[0][:2]).sum())


def on_packed(step: common.Step, packed: list[Any]) -> common.Step:
    """A step that trains on the packed collation of the same pairs as batch i."""
    return lambda inputs, targets, i: step(*packed[i], i)


# --- models and steps ---------------------------------------------------------------------


def hf_step(model: Any, bf16: bool, masks: list[torch.Tensor]) -> common.Step:
    """The peer's plain loop; `masks[i]` is the attention mask of batch i."""
    model.train()
    optimizer = common.peer_adamw(model.parameters(), lr=OPTIM.lr, weight_decay=0.0)

    def step(inputs: Any, targets: torch.Tensor, i: int) -> None:
        ids = inputs[0]
        B = targets.size(0)
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            r = model(input_ids=ids, attention_mask=masks[i]).logits.squeeze(-1)
        r = r.float()
        loss = -F.logsigmoid(r[:B] - r[B:]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


# --- results ------------------------------------------------------------------------------


def shape_result(
    times: dict[str, list[list[float]]],
    first_step_s: float | None,
    batches: list[Batch],
    args: Any,
    **head: Any,
) -> dict[str, Any]:
    timed = range(args.warmup, args.warmup + args.steps)
    pairs = PAIRS * len(timed)
    tokens = sum(real_tokens(batches[i]) for i in timed)
    out: dict[str, Any] = {}
    for v, reps in times.items():
        rates = [pairs / sum(rep) for rep in reps]
        out[v] = {
            "pairs_per_s": common.median(rates),
            "pairs_per_s_repeats": rates,
            "real_tokens_per_s": common.median([tokens / sum(rep) for rep in reps]),
            "steps_timed": len(timed),
            "repeats": len(reps),
            "step_s_median": common.median([t for rep in reps for t in rep]),
            "step_s_raw": reps,
        }
    peer_name = max(PEERS, key=lambda v: out[v]["pairs_per_s"])
    ours = [v for v in out if v.startswith("lmforge")]
    ours_name = max(ours, key=lambda v: out[v]["pairs_per_s"])
    peer, ours = out[peer_name]["pairs_per_s"], out[ours_name]["pairs_per_s"]
    compile_s = None
    if first_step_s is not None:
        compile_s = first_step_s - out[common.COMPILED]["step_s_median"]
    return {
        **head,
        "timed_real_tokens_per_step": tokens / len(timed),
        "compile_s": compile_s,
        "compile_first_step_s": first_step_s,
        "variants": out,
        "peer_best": peer_name,
        "peer_best_pairs_per_s": peer,
        "lmforge_best": ours_name,
        "lmforge_best_pairs_per_s": ours,
        "ratios": {f"{v}/peer_best": o["pairs_per_s"] / peer for v, o in out.items()},
        "ratio": ours / peer,
        "ratio_eager": out["lmforge_eager"]["pairs_per_s"] / peer,
        "target_ratio": TARGET,
        "meets_target": ours / peer >= TARGET,
    }


def rows_for(name: str, res: dict[str, Any]) -> list[list[Any]]:
    rows = [
        [
            name,
            v,
            o["pairs_per_s"],
            o["real_tokens_per_s"],
            f"{o['step_s_median']:.4f}",
            f"{res['ratios'][f'{v}/peer_best']:.2f}x",
        ]
        for v, o in res["variants"].items()
    ]
    best = f"{res['lmforge_best']} / {res['peer_best']}"
    rows.append([name, best, f"{res['ratio']:.2f}x", "", "", f"target {TARGET}x"])
    if res["compile_s"] is not None:
        rows.append([name, "compile time", f"{res['compile_s']:.1f} s", "", "", ""])
    return rows


def main() -> None:
    p = common.base_parser(__doc__)
    p.add_argument("--shapes", default="default", help="comma-separated: default,large")
    args, _inductor_dir = common.throughput_args(p)

    t0 = time.perf_counter()
    tok = common.world_tokenizer(args.seed)
    prefs, data_info = world_preferences(args.seed)
    batches, packed, masks, batch_info = build_batches(
        tok, prefs, args.warmup + args.steps, args.seed
    )
    data_info |= batch_info
    data_info["tokenizer"] = (
        f"bpe {common.WORLD_VOCAB} on generate_corpus(WorldConfig(n_docs={common.WORLD_DOCS}))"
        ".train"
    )
    data_info["tokenizer_vocab_size"] = tok.vocab_size
    data_info["setup_s"] = time.perf_counter() - t0
    print(
        f"data: {data_info['n_pairs']} pairs from {data_info['n_prompts']} prompts, "
        f"mean {data_info['seq_len_mean']:.1f} tokens/sequence, padding "
        f"{data_info['padding_share']:.1%}, vocab {tok.vocab_size}, "
        f"setup {data_info['setup_s']:.1f} s",
        flush=True,
    )
    dtype = autocast_dtype("auto", torch.device("cpu"))
    loss = pair_loss(margin=0.0)
    timed = range(args.warmup, args.warmup + args.steps)
    tokens_per_step = sum(real_tokens(batches[i]) for i in timed) / len(timed)

    from transformers import LlamaForSequenceClassification

    results = {}
    for name in args.shapes.split(","):
        cfg = TransformerConfig(vocab_size=tok.vocab_size, max_seq_len=BLOCK, **SHAPES[name])
        print(f"== {name}: {cfg}", flush=True)
        torch.manual_seed(args.seed)
        steps: dict[str, common.Step] = {}
        models: dict[str, torch.nn.Module] = {}
        for v in ("lmforge_eager", PEERS[0], "lmforge_packed", common.COMPILED, PEERS[1]):
            if v == common.COMPILED and args.no_compile:
                continue
            if v == "lmforge_packed":  # the reward stage's default: pairs packed into rows
                models[v] = RewardModel(Decoder(cfg))
                step = common.lmforge_step(models[v], False, loss_fn=loss, optim=OPTIM)
                steps[v] = on_packed(step, packed)
            elif v.startswith("hf"):
                hf_cfg = common.llama_config(cfg, num_labels=1)
                models[v] = LlamaForSequenceClassification(hf_cfg)
                steps[v] = hf_step(models[v], v.endswith("bf16"), masks)
            else:
                models[v] = RewardModel(Decoder(cfg))
                steps[v] = common.lmforge_step(
                    models[v],
                    v == common.COMPILED,
                    loss_fn=loss,
                    optim=OPTIM,
                    dynamic=True,
                )
        params = {
            "lmforge": common.n_params(models["lmforge_eager"]),
            "hf": common.n_params(models[PEERS[0]]),
        }
        # The same trunk and a D -> 1 head; lmforge's head also has a bias.
        assert params["lmforge"] == params["hf"] + 1, f"the shapes differ: {params}"
        counters = torch._dynamo.utils.counters  # graph breaks and recompiles of the compile
        counters.clear()
        # (printed lines: real tokens/s from each repeat's median step)
        times, first_step_s = common.time_variants(steps, batches, args, tokens_per_step)
        dynamo = {
            "graph_breaks": sum(counters["graph_break"].values()),
            "unique_graphs": counters["stats"]["unique_graphs"],
        }
        results[name] = shape_result(
            times,
            first_step_s,
            batches,
            args,
            shape=dataclasses.asdict(cfg),
            params=params,
            pairs_per_step=PAIRS,
            block_size=BLOCK,
            optim=dataclasses.asdict(OPTIM),
            lmforge_autocast=str(dtype),
            peer_attn_implementation=models[PEERS[0]].config._attn_implementation,
            compile_dynamo=None if args.no_compile else dynamo,
            data=data_info,
        )
        res = results[name]
        print(
            f"  {name}: {res['lmforge_best']} {res['lmforge_best_pairs_per_s']:,.1f} pairs/s, "
            f"{res['peer_best']} {res['peer_best_pairs_per_s']:,.1f}: {res['ratio']:.2f}x",
            flush=True,
        )

    target = f"lmforge best >= {TARGET}x peer best pairs/s (reward-model training)"
    common.write_throughput("reward_throughput", args, target, results)
    rows = [row for name, res in results.items() for row in rows_for(name, res)]
    headers = ["shape", "variant", "pairs/s", "real tok/s", "step s", "vs peer"]
    print(common.table(headers, rows))


if __name__ == "__main__":
    main()
