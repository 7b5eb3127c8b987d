"""Checkpoints of other projects, converted on load into the raytrain decoder family.

Each supported `config.json` `model_type` maps to a config converter and a weight converter:
- `openelm`: Apple's official OpenELM layout (`OpenELMForCausalLM` names, per-layer head and FFN lists);
- `llama`: Hugging Face `LlamaForCausalLM` (separate q/k/v and gate/up projections are fused into the family's
  `qkv_proj` and `proj_1`; no QK-norm; untied head unless `tie_word_embeddings`). Only the default RoPE is exact here;
  scaled RoPE variants are refused rather than loaded wrongly.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch

from raytrain.config import RaytrainError
from raytrain.models.decoder import DecoderConfig, make_divisible

State = dict[str, torch.Tensor]


def openelm_config(raw: dict[str, Any]) -> DecoderConfig:
    """`OpenELMConfig` (Hugging Face `apple/OpenELM-*` config.json) -> DecoderConfig with explicit layer lists."""
    d = raw["model_dim"]
    ffn = [make_divisible(m * d, raw.get("ffn_dim_divisor", 256)) for m in raw["ffn_multipliers"]]
    return DecoderConfig(
        name=_name(raw, "openelm"), vocab_size=raw["vocab_size"], d_model=d, n_layers=raw["num_transformer_layers"],
        head_dim=raw["head_dim"], q_heads=list(raw["num_query_heads"]), kv_heads=list(raw["num_kv_heads"]),
        ffn_dim=ffn, rope_theta=float(raw.get("rope_freq_constant", 10000)),
        max_seq_len=raw.get("max_context_length", 2048), rope_cache_len=raw.get("rope_max_length", 4096),
        qk_norm=raw.get("normalize_qk_projections", True), tie_embeddings=raw.get("share_input_output_layers", True))


def openelm_name(name: str) -> str:
    """`transformer.layers.3.attn.qkv_proj.weight` -> `layers.3.attn.qkv_proj.weight`, and so on."""
    name = re.sub(r"^transformer\.", "", name)
    return {"token_embeddings.weight": "embed.weight", "lm_head.weight": "head.weight"}.get(name, name)


def openelm_state(state: State, cfg: DecoderConfig) -> State:
    return {openelm_name(name): tensor for name, tensor in state.items()}


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
