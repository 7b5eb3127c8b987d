"""Checkpoints of other projects, converted on load into the raytrain decoder family.

Each supported `config.json` `model_type` maps to a config converter and a weight converter:
- `openelm`: Apple's official OpenELM layout (`OpenELMForCausalLM` names; shapes derived from the config as Apple's
  `OpenELMConfig` derives them, its defaults for missing keys, and every key that would change the computation
  either honoured or refused by name);
- `llama`: Hugging Face `LlamaForCausalLM` (separate q/k/v and gate/up projections are fused into the family's
  `qkv_proj` and `proj_1`; no QK-norm; untied head unless `tie_word_embeddings`). Only the default RoPE is exact here;
  scaled RoPE variants are refused rather than loaded wrongly.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from raytrain.config import RaytrainError
from raytrain.models.decoder import DecoderConfig, make_divisible

State = dict[str, torch.Tensor]
log = logging.getLogger(__name__)


OPENELM_DEFAULTS: dict[str, Any] = {  # Apple's `OpenELMConfig.__init__` defaults, for keys a config.json leaves out
    "vocab_size": 32000, "max_context_length": 2048, "num_transformer_layers": 12, "model_dim": 2048,
    "head_dim": 128, "qkv_multipliers": 1.0, "num_gqa_groups": 1, "ffn_multipliers": 4.0, "ffn_with_glu": True,
    "ffn_dim_divisor": 256, "activation_fn_name": "swish", "normalization_layer_name": "rms_norm",
    "normalize_qk_projections": False, "share_input_output_layers": False, "rope_freq_constant": 10000,
    "rope_max_length": 4096,
}
OPENELM_CHECKED = ("num_query_heads", "num_kv_heads", "tie_word_embeddings")  # derived or implied; must agree
OPENELM_INERT = {  # keys that do not change the forward pass: metadata, initialisation, generation defaults
    "model_type", "architectures", "auto_map", "torch_dtype", "dtype", "transformers_version", "_name_or_path",
    "_commit_hash", "_attn_implementation", "initializer_range", "use_cache", "bos_token_id", "eos_token_id",
    "pad_token_id", "return_dict", "output_attentions", "output_hidden_states", "torchscript", "use_bfloat16",
}
SILU_NAMES = ("swish", "silu")  # both are SiLU in transformers' ACT2FN, which Apple's modeling code uses


def openelm_config(raw: dict[str, Any]) -> DecoderConfig:
    """`OpenELMConfig` (Hugging Face `apple/OpenELM-*` config.json) -> DecoderConfig, computing the per-layer shapes
    exactly as Apple's `OpenELMConfig.__post_init__` does (heads from `qkv_multipliers` and `num_gqa_groups`, FFN
    widths from `ffn_multipliers` in any of its three forms). Missing keys take Apple's defaults; a key this decoder
    cannot honour, or a malformed value, raises ValueError naming the key."""
    unknown = sorted(set(raw) - set(OPENELM_DEFAULTS) - set(OPENELM_CHECKED) - OPENELM_INERT)
    if unknown:
        raise ValueError(f"{unknown[0]}: an OpenELM config key this loader does not honour")
    c = {**OPENELM_DEFAULTS, **raw}
    for key in ("vocab_size", "max_context_length", "num_transformer_layers", "model_dim", "head_dim",
                "num_gqa_groups", "ffn_dim_divisor", "rope_max_length"):
        if not _is_int(c[key]) or c[key] < 1:
            raise ValueError(f"{key}={c[key]!r}: must be a positive integer")
    for key in ("ffn_with_glu", "normalize_qk_projections", "share_input_output_layers"):
        if not isinstance(c[key], bool):
            raise ValueError(f"{key}={c[key]!r}: must be true or false")
    if not c["ffn_with_glu"]:
        raise ValueError("ffn_with_glu=false: the decoder family has SwiGLU feed-forward layers only")
    if c["activation_fn_name"] not in SILU_NAMES:
        raise ValueError(f"activation_fn_name={c['activation_fn_name']!r}: the decoder family computes SiLU "
                         f"({' or '.join(SILU_NAMES)}) only")
    if c["normalization_layer_name"] != "rms_norm":
        raise ValueError(f"normalization_layer_name={c['normalization_layer_name']!r}: only rms_norm is supported")
    if not _is_number(c["rope_freq_constant"]) or c["rope_freq_constant"] <= 0:
        raise ValueError(f"rope_freq_constant={c['rope_freq_constant']!r}: must be a positive number")
    n, d, hd, groups = c["num_transformer_layers"], c["model_dim"], c["head_dim"], c["num_gqa_groups"]
    q_heads = [make_divisible(d * m, hd * groups) // hd for m in _multipliers(c, "qkv_multipliers", n, ramp_only=True)]
    kv_heads = [q // groups for q in q_heads]
    ffn = [make_divisible(m * d, c["ffn_dim_divisor"]) for m in _multipliers(c, "ffn_multipliers", n)]
    for key, derived in (("num_query_heads", q_heads), ("num_kv_heads", kv_heads)):
        if key in raw and raw[key] != derived:
            raise ValueError(f"{key}={raw[key]}: Apple's OpenELMConfig derives {derived} from qkv_multipliers and "
                             "num_gqa_groups (and ignores this list); the config contradicts itself")
    if raw.get("tie_word_embeddings", c["share_input_output_layers"]) != c["share_input_output_layers"]:
        raise ValueError(f"tie_word_embeddings={raw['tie_word_embeddings']} contradicts share_input_output_layers="
                         f"{c['share_input_output_layers']}")
    return DecoderConfig(
        name=_name(raw, "openelm"), vocab_size=c["vocab_size"], d_model=d, n_layers=n, head_dim=hd, q_heads=q_heads,
        kv_heads=kv_heads, ffn_dim=ffn, rope_theta=float(c["rope_freq_constant"]), max_seq_len=c["max_context_length"],
        # Apple's RoPE table grows with the keys and its values do not depend on its length: cover the context
        rope_cache_len=max(c["rope_max_length"], c["max_context_length"]),
        qk_norm=c["normalize_qk_projections"], tie_embeddings=c["share_input_output_layers"])


def _multipliers(c: dict[str, Any], key: str, n_layers: int, ramp_only: bool = False) -> list[float]:
    """A number (every layer), two numbers (a linear ramp over the layers, rounded to 2 decimals as Apple's config
    does) or, for FFN multipliers, one number per layer."""
    value = c[key]
    if _is_number(value):
        return [float(value)] * n_layers
    if isinstance(value, (list, tuple)) and all(_is_number(v) for v in value):
        if len(value) == 2:
            return [round(float(v), 2) for v in np.linspace(value[0], value[1], num=n_layers, dtype=float)]
        if len(value) == n_layers and not ramp_only:
            return [float(v) for v in value]
    forms = "a number or two numbers" if ramp_only else f"a number, two numbers or {n_layers} numbers (one a layer)"
    raise ValueError(f"{key}={value!r}: expected {forms}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def openelm_name(name: str) -> str:
    """`transformer.layers.3.attn.qkv_proj.weight` -> `layers.3.attn.qkv_proj.weight`, and so on."""
    name = re.sub(r"^transformer\.", "", name)
    return {"token_embeddings.weight": "embed.weight", "lm_head.weight": "head.weight"}.get(name, name)


def openelm_state(state: State, cfg: DecoderConfig) -> State:
    """Renamed tensors; Apple's untied models also store `transformer.classifier`, a linear layer their forward
    never uses (logits come from `lm_head`), which is dropped."""
    if "transformer.classifier.weight" in state:
        log.info("ignoring transformer.classifier.weight: OpenELM's forward pass never uses it (lm_head is the head)")
    return {openelm_name(name): tensor for name, tensor in state.items()
            if not name.startswith("transformer.classifier.")}


def llama_config(raw: dict[str, Any]) -> DecoderConfig:
    rope = raw.get("rope_parameters") or {"rope_type": "default", "rope_theta": raw.get("rope_theta", 10000.0)}
    if rope.get("rope_type", "default") != "default" or raw.get("rope_scaling"):
        raise RaytrainError(f"Llama checkpoint with RoPE scaling {rope.get('rope_type')}: not supported")
    if raw.get("attention_bias") or raw.get("mlp_bias"):
        raise RaytrainError("Llama checkpoint with attention or MLP biases: not supported")
    heads = raw["num_attention_heads"]
    return DecoderConfig(
        name=_name(raw, "llama"), vocab_size=raw["vocab_size"], d_model=raw["hidden_size"],
        n_layers=raw["num_hidden_layers"], head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
        q_heads=heads, kv_heads=raw.get("num_key_value_heads") or heads, ffn_dim=raw["intermediate_size"],
        rope_theta=float(rope["rope_theta"]), max_seq_len=raw["max_position_embeddings"],
        rope_cache_len=raw["max_position_embeddings"], norm_eps=raw.get("rms_norm_eps", 1e-6), qk_norm=False,
        tie_embeddings=raw.get("tie_word_embeddings", False))


def llama_state(state: State, cfg: DecoderConfig) -> State:
    out = {"embed.weight": state["model.embed_tokens.weight"], "norm.weight": state["model.norm.weight"]}
    if "lm_head.weight" in state and not cfg.tie_embeddings:
        out["head.weight"] = state["lm_head.weight"]
    for i in range(cfg.n_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        attn, mlp = src + "self_attn.", src + "mlp."
        out[dst + "attn.qkv_proj.weight"] = torch.cat([state[attn + p + ".weight"] for p in ("q_proj", "k_proj",
                                                                                              "v_proj")])
        out[dst + "attn.out_proj.weight"] = state[attn + "o_proj.weight"]
        out[dst + "ffn.proj_1.weight"] = torch.cat([state[mlp + "gate_proj.weight"], state[mlp + "up_proj.weight"]])
        out[dst + "ffn.proj_2.weight"] = state[mlp + "down_proj.weight"]
        out[dst + "attn_norm.weight"] = state[src + "input_layernorm.weight"]
        out[dst + "ffn_norm.weight"] = state[src + "post_attention_layernorm.weight"]
    return out


def _name(raw: dict[str, Any], default: str) -> str:
    return (raw.get("_name_or_path") or default).rstrip("/").split("/")[-1] or default


FORMATS: dict[str, tuple[Callable[[dict[str, Any]], DecoderConfig], Callable[[State, DecoderConfig], State]]] = {
    "openelm": (openelm_config, openelm_state),
    "llama": (llama_config, llama_state),
}
