"""Hugging Face interop: our `Decoder` as a Llama-architecture model, in memory or on disk.

The decoder is Llama's architecture (RMSNorm, rotary, SwiGLU, grouped-query heads, no biases),
so the mapping is only renaming and splitting, never arithmetic:
- the fused `qkv` projection holds rows q | k | v; it splits into q_proj, k_proj, v_proj;
- the fused SwiGLU `gate_up` holds rows gate | up; it splits into gate_proj, up_proj;
- rotary uses the rotate-half layout on both sides (`layers.apply_rope`), so q and k rows need
  no permutation (the interleaved layout of Meta's checkpoints would);
- a tied LM head is not written; `tie_word_embeddings` makes Hugging Face share it again.
tests/models/test_llama_parity.py checks the mapping logit for logit; the benchmarks use it to
give their Hugging Face peers our weights.

`export_hf` writes the folder `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained` load:
config.json, model.safetensors, tokenizer.json, tokenizer_config.json (the chat template as
Jinja) and generation_config.json. Text encodes to our ids: no bos is added at encode time (ours
adds none either; the chat template writes its own), and the unigram tokenizer's space/"▁" swap,
which our wrapper applies outside the Hugging Face tokenizer, is baked into its vocabulary.

transformers is imported inside the functions: it is heavy and only these paths need it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from lmforge.errors import UserError
from lmforge.io import atomic_dir
from lmforge.models.decoder import Decoder
from lmforge.models.layers import Block
from lmforge.models.transformer import TransformerConfig
from lmforge.tokenizers import Tokenizer
from lmforge.tokenizers.chat import JINJA_TEMPLATE, end_of_turn_id

if TYPE_CHECKING:
    from transformers import LlamaConfig, LlamaForCausalLM


def llama_config(cfg: TransformerConfig, **overrides: Any) -> LlamaConfig:
    """A `transformers.LlamaConfig` of the same shape as `cfg` (dropout 0, no biases), pad id 0
    (our `<|pad|>`), no bos/eos; `overrides` add or replace fields (num_labels, token ids)."""
    from transformers import LlamaConfig

    fields: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.n_embd,
        intermediate_size=cfg.ff_width,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_size,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=0.0,
        initializer_range=cfg.init_std,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    return LlamaConfig(**{**fields, **overrides})


def to_llama_state_dict(model: Decoder) -> dict[str, torch.Tensor]:
    """Our weights under `LlamaForCausalLM` names, as fresh contiguous tensors (safetensors
    refuses views that share storage). No `lm_head.weight` when the head is tied."""
    c = model.cfg
    q, kv, F = c.n_head * c.head_size, c.kv_heads * c.head_size, c.ff_width
    sd = {"model.embed_tokens.weight": model.tok_emb.weight, "model.norm.weight": model.norm.weight}
    if not c.tie_embeddings:
        sd["lm_head.weight"] = model.lm_head.weight
    for i, b in enumerate(model.blocks):
        assert isinstance(b, Block)
        p = f"model.layers.{i}."
        qkv, gate_up = b.attn.qkv.weight, b.mlp.gate_up.weight  # (q + 2 kv, D), (2 F, D)
        sd |= {
            p + "input_layernorm.weight": b.attn_norm.weight,
            p + "self_attn.q_proj.weight": qkv[:q],
            p + "self_attn.k_proj.weight": qkv[q : q + kv],
            p + "self_attn.v_proj.weight": qkv[q + kv :],
            p + "self_attn.o_proj.weight": b.attn.proj.weight,
            p + "post_attention_layernorm.weight": b.mlp_norm.weight,
            p + "mlp.gate_proj.weight": gate_up[:F],
            p + "mlp.up_proj.weight": gate_up[F:],
            p + "mlp.down_proj.weight": b.mlp.down.weight,
        }
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def to_llama(model: Decoder, **overrides: Any) -> LlamaForCausalLM:
    """A `transformers.LlamaForCausalLM` (config `llama_config(model.cfg, **overrides)`) holding
    an fp32 copy of `model`'s weights: the same function, logits equal up to float rounding."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM(llama_config(model.cfg, **overrides))
    missing, unexpected = hf.load_state_dict(to_llama_state_dict(model), strict=False)
    tied = {"lm_head.weight"} if model.cfg.tie_embeddings else set()
    if unexpected or any(m not in tied and "rotary" not in m for m in missing):
        raise RuntimeError(f"Llama weight mapping: missing {missing}, unexpected {unexpected}")
    return hf


def export_hf(model: Decoder, tok: Tokenizer, out_dir: Path, *, overwrite: bool = False) -> None:
    """Write `model` and `tok` to `out_dir` as a Hugging Face Llama checkpoint.

    The files are written into a temporary folder beside `out_dir` and renamed when complete;
    an existing non-empty `out_dir` is refused unless `overwrite`.
    """
    if not isinstance(model, Decoder):  # encoders and reward models have no Llama counterpart
        raise UserError(f"export to hf: needs a decoder, not {type(model).__name__}")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"{out_dir}: already exists and is not empty; --overwrite replaces it")
    cfg = model.cfg
    eot = end_of_turn_id(tok)
    dtype = str(model.tok_emb.weight.dtype).removeprefix("torch.")
    config = llama_config(
        cfg,
        architectures=["LlamaForCausalLM"],  # what loaders such as vLLM dispatch on
        bos_token_id=tok.bos_id,
        eos_token_id=eot,
        pad_token_id=tok.pad_id,
    )
    # Our chat stops at <|end_of_turn|>, plain `lmforge generate` at <|eos|>: stop at either.
    generation = {
        "bos_token_id": tok.bos_id,
        "eos_token_id": [eot, tok.eos_id],
        "pad_token_id": tok.pad_id,
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out_dir) as tmp:
        save_file(to_llama_state_dict(model), str(tmp / "model.safetensors"), {"format": "pt"})
        _write_json(tmp / "config.json", {**config.to_dict(), "dtype": dtype})
        _write_json(tmp / "generation_config.json", generation)
        (tmp / "tokenizer.json").write_text(hf_tokenizer_json(tok), encoding="utf-8")
        _write_json(tmp / "tokenizer_config.json", tokenizer_config(tok, cfg.max_seq_len))


def tokenizer_config(tok: Tokenizer, max_seq_len: int) -> dict[str, Any]:
    """tokenizer_config.json: our specials, the chat template, and no bos/eos added to text."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": JINJA_TEMPLATE,
        "bos_token": tok.id_to_token(tok.bos_id),
        # The end of an assistant turn, where HF generation and chat pipelines should stop.
        "eos_token": tok.id_to_token(end_of_turn_id(tok)),
        "pad_token": tok.id_to_token(tok.pad_id),
        "unk_token": tok.id_to_token(tok.unk_id),
        "mask_token": tok.id_to_token(tok.mask_id),
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # decoding is exact; no space "clean-up"
        "model_max_length": max_seq_len,
    }


def hf_tokenizer_json(tok: Tokenizer) -> str:
    """Our tokenizer.json, made to encode raw text by itself.

    Only unigram needs a change: our wrapper swaps " " and "▁" around the HF tokenizer, which a
    HF normalizer cannot express (a swap needs a spare character). Swapping them inside every
    piece and in the pre-tokenizer's split instead gives the same segmentation of the raw text,
    so the same ids, and pieces that decode to the raw text.
    """
    text = tok.json  # the exact tokenizer.json bytes that our fingerprint covers
    if tok.algo != "unigram":
        return text
    data = json.loads(text)
    data["model"]["vocab"] = [[_swap_space(p), s] for p, s in data["model"]["vocab"]]
    pre = data["pre_tokenizer"]
    if pre.get("type") != "Split" or pre["pattern"] != {"String": "▁"}:
        raise ValueError(f"unexpected unigram pre-tokenizer {pre}")
    pre["pattern"] = {"String": " "}
    return json.dumps(data, ensure_ascii=False, indent=2)


def _swap_space(piece: str) -> str:
    return piece.translate({ord(" "): "▁", ord("▁"): " "})


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
