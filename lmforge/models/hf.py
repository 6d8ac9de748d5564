"""Hugging Face interop: our `Decoder` to and from Llama, Qwen2 and GPT-2 checkpoints.

The three families are our decoder with some architecture options (`TransformerConfig.norm`,
`mlp`, `positions`, `qkv_bias`, `bias`): Llama is the default, Qwen2 adds q/k/v biases, GPT-2
is LayerNorm + GELU MLP + learned positions + biases. The weight mapping is renaming, splitting
and (GPT-2's Conv1D, stored in x out) transposing, never arithmetic, and one table
(`weight_pieces`) serves both directions:
- our fused `qkv` holds rows q | k | v (q_proj, k_proj, v_proj; GPT-2's c_attn is already fused);
- our fused SwiGLU `gate_up` holds rows gate | up (gate_proj, up_proj);
- rotary uses the rotate-half layout on both sides (`layers.apply_rope`), so q and k rows need
  no permutation (the interleaved layout of Meta's original checkpoints would);
- a tied LM head is not written; `tie_word_embeddings` makes Hugging Face share it again.

Export (`export_hf`) writes the folder `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained`
load: config.json, model.safetensors, tokenizer.json, tokenizer_config.json (the chat template as
Jinja) and generation_config.json. Text encodes to our ids: no bos is added at encode time (ours
adds none either; the chat template writes its own), and the unigram tokenizer's space/"▁" swap,
which our wrapper applies outside the Hugging Face tokenizer, is baked into its vocabulary.

Import (`import_hf`) reads such a folder without transformers and without running any code from
it: config.json, the safetensors weights (sharded or not; pickle files are refused, since
unpickling can run code) and the tokenizer (`tokenizers.imported`). A config that names its own
code (`auto_map`) or an architecture outside the three is refused with the list of supported ones.

transformers is imported inside the export functions: it is heavy and only those paths need it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmforge.config import build, to_dict
from lmforge.errors import UserError
from lmforge.io import atomic_dir, pickle_note
from lmforge.models.decoder import Decoder
from lmforge.models.transformer import TransformerConfig
from lmforge.tokenizers import ImportedTokenizer, Tokenizer
from lmforge.tokenizers.chat import PLAIN_TEMPLATE, end_of_turn_id, jinja_template
from lmforge.tokenizers.imported import load_hf_tokenizer

if TYPE_CHECKING:
    from transformers import LlamaConfig, PretrainedConfig, PreTrainedModel

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}


def hf_arch(cfg: TransformerConfig) -> str:
    """The Hugging Face family whose architecture `cfg` is; UserError when none is."""
    if cfg.is_default_architecture:
        return "llama"
    options = (cfg.norm, cfg.mlp, cfg.positions, cfg.qkv_bias, cfg.bias)
    if options == ("rmsnorm", "swiglu", "rope", True, False):
        return "qwen2"
    if options == ("layernorm", "gelu", "learned", True, True) and cfg.kv_heads == cfg.n_head:
        return "gpt2"
    raise UserError(
        f"no Hugging Face architecture matches norm={cfg.norm} mlp={cfg.mlp} "
        f"positions={cfg.positions} qkv_bias={cfg.qkv_bias} bias={cfg.bias}"
    )


# --------------------------------------------------------------------------------------------
# Configs


def hf_config(cfg: TransformerConfig, **overrides: Any) -> PretrainedConfig:
    """The transformers config of `cfg`'s family and shape (dropout 0), pad id 0 (our
    `<|pad|>`), no bos/eos; `overrides` add or replace fields (num_labels, token ids)."""
    arch = hf_arch(cfg)
    if arch == "gpt2":
        from transformers import GPT2Config

        fields: dict[str, Any] = dict(
            _common_fields(cfg),
            n_positions=cfg.max_seq_len,
            n_embd=cfg.n_embd,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            n_inner=cfg.ff_width,
            activation_function="gelu_new",
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            layer_norm_epsilon=cfg.norm_eps,
        )
        return GPT2Config(**{**fields, **overrides})
    if arch == "qwen2":
        from transformers import Qwen2Config

        return Qwen2Config(**{**_rope_fields(cfg), "use_sliding_window": False, **overrides})
    return llama_config(cfg, **overrides)


def llama_config(cfg: TransformerConfig, **overrides: Any) -> LlamaConfig:
    """A `transformers.LlamaConfig` of the same shape as `cfg`; see `hf_config`."""
    from transformers import LlamaConfig

    fields = {**_rope_fields(cfg), "attention_bias": False, "mlp_bias": False}
    return LlamaConfig(**{**fields, **overrides})


def _common_fields(cfg: TransformerConfig) -> dict[str, Any]:
    return dict(
        vocab_size=cfg.vocab_size,
        tie_word_embeddings=cfg.tie_embeddings,
        initializer_range=cfg.init_std,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )


def _rope_fields(cfg: TransformerConfig) -> dict[str, Any]:
    return dict(
        _common_fields(cfg),
        hidden_size=cfg.n_embd,
        intermediate_size=cfg.ff_width,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_size,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        hidden_act="silu",
        attention_dropout=0.0,
    )


def from_hf_config(raw: dict[str, Any], source: str) -> TransformerConfig:
    """Our config for a Hugging Face config.json (`raw`, read from `source`); UserError naming
    the field for anything the mapping cannot represent exactly."""
    supported = f"supported: {', '.join(ARCHITECTURES)}"
    if "auto_map" in raw:
        raise UserError(
            f"{source}: the model needs its own Python code (auto_map), which lmforge never "
            f"runs; {supported}"
        )
    kind = raw.get("model_type")
    if kind not in ARCHITECTURES:
        raise UserError(f"{source}: field 'model_type': {kind!r} is not importable; {supported}")

    def need(field: str) -> Any:
        if field not in raw or raw[field] is None:
            raise UserError(f"{source}: field '{field}': missing")
        return raw[field]

    def refuse(field: str, why: str) -> UserError:
        return UserError(f"{source}: field '{field}': {raw.get(field)!r} is not supported ({why})")

    if kind == "gpt2":
        if raw.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise refuse("activation_function", "GPT-2's tanh GELU only")
        if raw.get("scale_attn_by_inverse_layer_idx") or raw.get("scale_attn_weights") is False:
            raise refuse("scale_attn_by_inverse_layer_idx", "only 1/sqrt(head size) scaling")
        n_embd = need("n_embd")
        fields: dict[str, Any] = dict(
            vocab_size=need("vocab_size"),
            n_layer=need("n_layer"),
            n_head=need("n_head"),
            n_embd=n_embd,
            d_ff=raw.get("n_inner") or 4 * n_embd,
            max_seq_len=need("n_positions"),
            tie_embeddings=raw.get("tie_word_embeddings", True),
            norm_eps=raw.get("layer_norm_epsilon", 1e-5),
            init_std=raw.get("initializer_range", 0.02),
            norm="layernorm",
            mlp="gelu",
            positions="learned",
            qkv_bias=True,
            bias=True,
        )
    else:
        if raw.get("hidden_act", "silu") != "silu":
            raise refuse("hidden_act", "SwiGLU with silu only")
        rope = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise refuse("rope_scaling", "plain rotary positions only")
        hidden, heads = need("hidden_size"), need("num_attention_heads")
        if raw.get("head_dim") not in (None, hidden // heads):
            raise refuse("head_dim", "must be hidden_size / num_attention_heads")
        if kind == "llama" and (raw.get("attention_bias") or raw.get("mlp_bias")):
            field = "attention_bias" if raw.get("attention_bias") else "mlp_bias"
            raise refuse(field, "Llama without biases only")
        window = raw.get("sliding_window")
        if raw.get("use_sliding_window") and window and window < need("max_position_embeddings"):
            raise refuse("use_sliding_window", "full attention only")
        fields = dict(
            vocab_size=need("vocab_size"),
            n_layer=need("num_hidden_layers"),
            n_head=heads,
            n_kv_head=raw.get("num_key_value_heads") or heads,
            n_embd=hidden,
            d_ff=need("intermediate_size"),
            max_seq_len=need("max_position_embeddings"),
            rope_theta=raw.get("rope_theta", rope.get("rope_theta", 10000.0)),
            tie_embeddings=raw.get("tie_word_embeddings", False),
            norm_eps=raw.get("rms_norm_eps", 1e-6),
            init_std=raw.get("initializer_range", 0.02),
            qkv_bias=kind == "qwen2",
        )
    return build(TransformerConfig, fields, source)


# --------------------------------------------------------------------------------------------
# Weights


@dataclass(frozen=True)
class Piece:
    """One Hugging Face tensor making up (part of) one of ours."""

    name: str
    rows: int = 0  # rows of our tensor it holds, where ours fuses several (0: all of them)
    transpose: bool = False  # GPT-2's Conv1D stores (in, out), nn.Linear (out, in)


def weight_pieces(cfg: TransformerConfig) -> dict[str, list[Piece]]:
    """Each of our parameter names -> the Hugging Face tensors it is made of, in row order.
    The tied LM head is left out (it is the embedding)."""
    arch = hf_arch(cfg)
    names: dict[str, list[Piece]] = {}
    if arch == "gpt2":
        top = {"tok_emb": "wte", "pos_emb": "wpe", "norm": "ln_f"}
        for ours, theirs in top.items():
            names[f"{ours}.weight"] = [Piece(f"transformer.{theirs}.weight")]
        names["norm.bias"] = [Piece("transformer.ln_f.bias")]
        block = {"attn_norm": "ln_1", "attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj",
                 "mlp_norm": "ln_2", "mlp.up": "mlp.c_fc", "mlp.down": "mlp.c_proj"}  # fmt: skip
        for i in range(cfg.n_layer):
            for ours, theirs in block.items():
                p = f"transformer.h.{i}.{theirs}"
                conv = not ours.endswith("norm")
                names[f"blocks.{i}.{ours}.weight"] = [Piece(f"{p}.weight", transpose=conv)]
                names[f"blocks.{i}.{ours}.bias"] = [Piece(f"{p}.bias")]
    else:
        q, kv, F = cfg.n_head * cfg.head_size, cfg.kv_heads * cfg.head_size, cfg.ff_width
        names["tok_emb.weight"] = [Piece("model.embed_tokens.weight")]
        names["norm.weight"] = [Piece("model.norm.weight")]
        for i in range(cfg.n_layer):
            p, b = f"model.layers.{i}.", f"blocks.{i}."
            attn = p + "self_attn."
            kinds = ("weight", "bias") if cfg.qkv_bias else ("weight",)
            for kind in kinds:
                names[f"{b}attn.qkv.{kind}"] = [
                    Piece(f"{attn}q_proj.{kind}", q),
                    Piece(f"{attn}k_proj.{kind}", kv),
                    Piece(f"{attn}v_proj.{kind}", kv),
                ]
            names |= {
                b + "attn_norm.weight": [Piece(p + "input_layernorm.weight")],
                b + "attn.proj.weight": [Piece(attn + "o_proj.weight")],
                b + "mlp_norm.weight": [Piece(p + "post_attention_layernorm.weight")],
                b + "mlp.gate_up.weight": [
                    Piece(p + "mlp.gate_proj.weight", F),
                    Piece(p + "mlp.up_proj.weight", F),
                ],
                b + "mlp.down.weight": [Piece(p + "mlp.down_proj.weight")],
            }
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = [Piece("lm_head.weight")]
    return names


def to_hf_state_dict(model: Decoder) -> dict[str, torch.Tensor]:
    """Our weights under Hugging Face names, as fresh contiguous tensors (safetensors refuses
    views that share storage). No `lm_head.weight` when the head is tied."""
    ours = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for name, pieces in weight_pieces(model.cfg).items():
        tensor = ours[name].detach()
        parts = (
            tensor.split([p.rows or tensor.size(0) for p in pieces])
            if len(pieces) > 1
            else [tensor]
        )
        for piece, part in zip(pieces, parts, strict=True):
            out[piece.name] = (part.t() if piece.transpose else part).clone().contiguous()
    return out


# Buffers some checkpoints carry that hold no weights (GPT-2's causal mask, rotary tables).
_IGNORED = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


def from_hf_state_dict(
    cfg: TransformerConfig, tensors: dict[str, torch.Tensor], source: str
) -> dict[str, torch.Tensor]:
    """Our state dict (fp32) from Hugging Face tensors; UserError naming a missing or an
    unexpected tensor."""
    if hf_arch(cfg) == "gpt2" and not any(k.startswith("transformer.") for k in tensors):
        # GPT2Model checkpoints (the hub's gpt2) lack the LMHead wrapper's prefix.
        tensors = {
            k if k == "lm_head.weight" else f"transformer.{k}": v for k, v in tensors.items()
        }
    sd: dict[str, torch.Tensor] = {}
    used = set()
    for name, pieces in weight_pieces(cfg).items():
        parts = []
        for piece in pieces:
            if piece.name not in tensors:
                raise UserError(f"{source}: tensor {piece.name!r} is missing")
            t = tensors[piece.name]
            parts.append(t.t() if piece.transpose else t)
            used.add(piece.name)
        sd[name] = torch.cat(parts).float() if len(parts) > 1 else parts[0].float()
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["tok_emb.weight"]
        used.add("lm_head.weight")  # some tied checkpoints store the copy anyway
    unexpected = [k for k in tensors if k not in used and not k.endswith(_IGNORED)]
    if unexpected:
        raise UserError(f"{source}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all)")
    return sd


def to_hf(model: Decoder, **overrides: Any) -> PreTrainedModel:
    """The transformers model of `model`'s family (config `hf_config(model.cfg, **overrides)`)
    holding an fp32 copy of its weights: the same function, logits equal up to rounding."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_config(hf_config(model.cfg, **overrides))
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model), strict=False)
    tied = {"lm_head.weight"} if model.cfg.tie_embeddings else set()
    if unexpected or any(m not in tied and not m.endswith(_IGNORED) for m in missing):
        raise RuntimeError(f"weight mapping: missing {missing}, unexpected {unexpected}")
    return hf


# --------------------------------------------------------------------------------------------
# Folders


def is_hf_dir(folder: Path) -> bool:
    """Whether `folder` looks like a Hugging Face model folder (not one of ours)."""
    try:
        raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and "family" not in raw and "model_type" in raw


def import_hf(folder: Path) -> tuple[Decoder, ImportedTokenizer, dict[str, Any]]:
    """A Hugging Face causal-LM folder as our decoder, its tokenizer and a config record."""
    config_path = folder / "config.json"
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{config_path}: cannot read ({e})") from None
    cfg = from_hf_config(raw, str(config_path))
    tok = load_hf_tokenizer(folder)
    if tok.vocab_size > cfg.vocab_size:
        raise UserError(
            f"{folder}: tokenizer has {tok.vocab_size} tokens but the model only {cfg.vocab_size}"
        )
    state = from_hf_state_dict(cfg, _read_weights(folder), str(folder))
    padding = cfg.vocab_size - tok.vocab_size
    if padding:
        # Rows past the tokenizer pad the embedding for speed (Qwen2: to a multiple of 128); no
        # text encodes to them, so they are dropped and no sampler can ever draw one.
        cfg = replace(cfg, vocab_size=tok.vocab_size)
        for name in ("tok_emb.weight", "lm_head.weight"):
            state[name] = state[name][: tok.vocab_size]
    model = Decoder(cfg)
    model.load_state_dict(state)
    record = {
        # A base model (no chat template of its own) is evaluated few-shot, like our own.
        "stage": "pretrain" if tok.chat_template == PLAIN_TEMPLATE else "import",
        "family": "decoder",
        "model": to_dict(cfg),
        "source": {
            "hugging_face": str(folder),
            "model_type": raw["model_type"],
            "vocab_padding_dropped": padding,
        },
    }
    return model.eval(), tok, record


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(
                set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
            )
        except (ValueError, KeyError, AttributeError) as e:
            raise UserError(f"{index}: malformed ({e})") from None
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise UserError(f"{folder}: no model.safetensors{pickle_note(folder)}")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            tensors |= load_file(str(folder / name))
        except (SafetensorError, OSError) as e:
            raise UserError(f"{folder / name}: cannot read ({e})") from None
    return tensors


def export_hf(model: Decoder, tok: Tokenizer, out_dir: Path, *, overwrite: bool = False) -> None:
    """Write `model` and `tok` to `out_dir` as a Hugging Face checkpoint of `model`'s family.

    The files are written into a temporary folder beside `out_dir` and renamed when complete;
    an existing non-empty `out_dir` is refused unless `overwrite`.
    """
    if not isinstance(model, Decoder):  # encoders and reward models have no counterpart here
        raise UserError(f"export to hf: needs a decoder, not {type(model).__name__}")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"{out_dir}: already exists and is not empty; --overwrite replaces it")
    cfg = model.cfg
    eot = end_of_turn_id(tok)
    dtype = str(model.tok_emb.weight.dtype).removeprefix("torch.")
    config = hf_config(
        cfg,
        architectures=[ARCHITECTURES[hf_arch(cfg)]],  # what loaders such as vLLM dispatch on
        bos_token_id=tok.bos_id,
        eos_token_id=eot,
        pad_token_id=tok.pad_id,
    )
    # Our chat stops at the end of a turn, plain `lmforge generate` at eos: stop at either.
    generation = {
        "bos_token_id": tok.bos_id,
        "eos_token_id": sorted({eot, tok.eos_id}),
        "pad_token_id": tok.pad_id,
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out_dir) as tmp:
        save_file(to_hf_state_dict(model), str(tmp / "model.safetensors"), {"format": "pt"})
        _write_json(tmp / "config.json", {**config.to_dict(), "dtype": dtype})
        _write_json(tmp / "generation_config.json", generation)
        (tmp / "tokenizer.json").write_text(hf_tokenizer_json(tok), encoding="utf-8")
        _write_json(tmp / "tokenizer_config.json", tokenizer_config(tok, cfg.max_seq_len))


def tokenizer_config(tok: Tokenizer, max_seq_len: int) -> dict[str, Any]:
    """tokenizer_config.json: our specials, the chat template, and no bos/eos added to text."""
    if isinstance(tok, ImportedTokenizer):  # its own tokens back, as they were
        return {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "chat_template": jinja_template(tok),
            "bos_token": tok.specials["bos"],
            "eos_token": tok.specials["eos"],  # generation_config.json stops at turn ends too
            "pad_token": tok.specials["pad"],
            "clean_up_tokenization_spaces": False,
            "model_max_length": max_seq_len,
        }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": jinja_template(tok),
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
