"""Decoder-only transformer family (plain PyTorch, no Ray).

One configurable architecture covers OpenELM and the AFM presets: pre-norm RMSNorm blocks, fused QKV projection with
per-head QK RMSNorm applied before rotary embeddings (OpenELM) or after them (AFM: axlearn rotates inside the QKV
projection; `qk_norm_after_rope`, since the learned gain does not commute with the rotation), grouped-query attention
through `scaled_dot_product_attention`, SwiGLU feed-forward and tied input/output embeddings. Per-layer widths come
either from OpenELM's layer-wise scaling (`LayerScaling`, with the reference rounding) or from explicit head/FFN
sizes.
Presets live in `conf/model/*.yaml`; see `../shared/specs/openelm.md` for the rules implemented here. With
`streams` set, the top layers can also run Speculative Streaming's multi-stream attention (`streams.py`,
`forward_streams`); the plain forward never uses them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from raytrain.models import ops
from raytrain.models.kv_cache import KVCache, attention
from raytrain.models.streams import MultiStreamAttention, PruningAdapter, StreamConfig, StreamStates


@dataclass
class LayerScaling:
    """OpenELM layer-wise scaling: attention and FFN widths grow linearly from the first layer to the last."""

    qkv: list[float] = field(default_factory=lambda: [0.5, 1.0])  # alpha_min, alpha_max
    ffn: list[float] = field(default_factory=lambda: [0.5, 4.0])  # beta_min, beta_max
    gqa_group: int = 4  # query heads per KV head (corenet's "num_gqa_groups")
    ffn_divisor: int = 256


@dataclass
class DecoderConfig:
    """Shape and numerics of one decoder. `q_heads`, `kv_heads`, `ffn_dim` take an int (every layer) or a list (one
    entry per layer); leave them unset to derive all three from `layer_scaling`."""

    name: str = "decoder"
    vocab_size: int = 32000
    vocab_rows: int | None = None  # embedding rows, >= vocab_size (OpenELM trains with 32128); None = vocab_size
    d_model: int = 512
    n_layers: int = 8
    head_dim: int = 64
    q_heads: Any = None
    kv_heads: Any = None
    ffn_dim: Any = None
    layer_scaling: LayerScaling | None = None
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    rope_cache_len: int | None = None  # positions precomputed for RoPE; None = 2 * max_seq_len (reference)
    norm_eps: float = 1e-6
    qk_norm: bool = True
    qk_norm_after_rope: bool = False  # AFM (axlearn) normalises rotated q, k; OpenELM normalises before RoPE
    tie_embeddings: bool = True
    output_init: str = "depth_scaled"  # out/down projections: depth_scaled (OpenELM) | fan_in (AFM, axlearn)
    streams: StreamConfig | None = None  # Speculative Streaming's stream embeddings and pruning adapter; None = off

    def __post_init__(self) -> None:
        if self.output_init not in ("depth_scaled", "fan_in"):
            raise ValueError(f"model {self.name}: output_init={self.output_init!r}; expected depth_scaled or fan_in")
        if self.layer_scaling is None and None in (self.q_heads, self.kv_heads, self.ffn_dim):
            raise ValueError(f"model {self.name}: set q_heads, kv_heads and ffn_dim, or layer_scaling")
        shapes = self.layer_shapes()
        for i, s in enumerate(shapes):
            if s.q_heads % s.kv_heads:
                raise ValueError(f"model {self.name}: layer {i} has {s.q_heads} query heads, "
                                 f"not a multiple of its {s.kv_heads} KV heads")
        if self.rows < self.vocab_size:
            raise ValueError(f"model {self.name}: vocab_rows={self.vocab_rows} is below vocab_size={self.vocab_size}")
        if self.streams is not None and self.streams.msa_layers >= self.n_layers:
            raise ValueError(f"model {self.name}: streams.msa_layers={self.streams.msa_layers} must be below "
                             f"n_layers={self.n_layers} (the streams start from a lower layer's output)")

    @property
    def max_positions(self) -> int:
        return self.rope_cache_len or 2 * self.max_seq_len

    @property
    def rows(self) -> int:
        return self.vocab_rows or self.vocab_size

    def output_std(self, fan_in: int) -> float:
        """Init std of the attention output and FFN down projections: OpenELM's d^-1/2 (2 L)^-1/2, or AFM's
        fan_in^-1/2 like every other linear layer."""
        if self.output_init == "fan_in":
            return fan_in ** -0.5
        return (self.d_model ** -0.5) * ((2 * self.n_layers) ** -0.5)

    def layer_shapes(self) -> list[LayerShape]:
        if self.layer_scaling is not None and None in (self.q_heads, self.kv_heads, self.ffn_dim):
            return layerwise_scaling(self.d_model, self.n_layers, self.head_dim, self.layer_scaling)
        q, kv, f = (_per_layer(v, self.n_layers, k) for k, v in
                    (("q_heads", self.q_heads), ("kv_heads", self.kv_heads), ("ffn_dim", self.ffn_dim)))
        return [LayerShape(*s) for s in zip(q, kv, f)]


@dataclass(frozen=True)
class LayerShape:
    q_heads: int
    kv_heads: int
    ffn_dim: int


def _per_layer(value: Any, n_layers: int, key: str) -> list[int]:
    if isinstance(value, int):
        return [value] * n_layers
    values = [int(v) for v in value]
    if len(values) != n_layers:
        raise ValueError(f"{key} has {len(values)} entries for {n_layers} layers")
    return values


def make_divisible(value: float, divisor: int) -> int:
    """corenet's rounding: nearest multiple of `divisor` (half up), at least `divisor`, never >10% below `value`."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def layerwise_scaling(d_model: int, n_layers: int, head_dim: int, scaling: LayerScaling) -> list[LayerShape]:
    """Per-layer (query heads, KV heads, FFN width) exactly as the OpenELM reference discretises them."""

    def ramp(lo: float, hi: float) -> list[float]:
        # the reference rounds numpy.linspace to 2 decimals first; that rounding decides the shapes
        return [round(float(x), 2) for x in np.linspace(lo, hi, n_layers)]

    shapes = []
    for alpha, beta in zip(ramp(*scaling.qkv), ramp(*scaling.ffn)):
        q = make_divisible(d_model * alpha, head_dim * scaling.gqa_group) // head_dim
        shapes.append(LayerShape(q, q // scaling.gqa_group, make_divisible(beta * d_model, scaling.ffn_divisor)))
    return shapes


class RMSNorm(nn.Module):
    """Normalises in fp32 and casts back to the input dtype before the gain, as the reference does."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class Linear(nn.Linear):
    """Bias-free linear layer drawn from N(0, std^2) in its own constructor, so that `deepspeed.zero.Init`, which
    partitions each module as soon as it is built, partitions initialised weights."""

    def __init__(self, d_in: int, d_out: int, std: float) -> None:
        self.std = std
        super().__init__(d_in, d_out, bias=False)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.std)


class Embedding(nn.Embedding):
    def __init__(self, rows: int, dim: int, std: float) -> None:
        self.std = std
        super().__init__(rows, dim)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.std)


def rope_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    """(hd/2,) fp32 inverse frequencies theta^(-2i/hd)."""
    return theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)


def rope_angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (*positions.shape, hd) in fp32, rotate-half layout, for integer or real-valued positions."""
    angles = positions.float()[..., None] * inv_freq  # (..., hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # (..., hd)
    return angles.cos(), angles.sin()


def rope_tables(head_dim: int, positions: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (positions, head_dim) in fp32, rotate-half layout."""
    return rope_angles(torch.arange(positions, dtype=torch.float32), rope_frequencies(head_dim, theta))


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig, shape: LayerShape) -> None:
        super().__init__()
        d, hd = cfg.d_model, cfg.head_dim
        self.n_q, self.n_kv, self.head_dim = shape.q_heads, shape.kv_heads, hd
        self.qkv_proj = Linear(d, (self.n_q + 2 * self.n_kv) * hd, std=d ** -0.5)
        self.q_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.norm_after_rope = cfg.qk_norm_after_rope
        self.out_proj = Linear(self.n_q * hd, d, std=cfg.output_std(self.n_q * hd))

    def project(self, x: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, d) -> q (B, n_q, T, hd), k and v (B, n_kv, T, hd); q and k normalised, then rotated (or rotated,
        then normalised: `qk_norm_after_rope`)."""
        B, T, _ = x.shape
        qkv = self.qkv_proj(x).view(B, T, self.n_q + 2 * self.n_kv, self.head_dim).transpose(1, 2)
        q, k, v = qkv.split([self.n_q, self.n_kv, self.n_kv], dim=1)
        if self.norm_after_rope:
            return self.q_norm(ops.rope(q, cos, sin)), self.k_norm(ops.rope(k, cos, sin)), v
        return ops.rope(self.q_norm(q), cos, sin), ops.rope(self.k_norm(k), cos, sin), v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: Any, layer: int) -> torch.Tensor:
        """`cache` (a `KVCache` or any object with its `attend`) decides which keys the queries see."""
        B, T, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        y = attention(q, k, v, None, T > 1) if cache is None else cache.attend(layer, q, k, v)  # (B, n_q, T, hd)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, self.n_q * self.head_dim))


class FeedForward(nn.Module):
    """SwiGLU: proj_1 yields (gate, up) halves; out = proj_2(silu(gate) * up)."""

    def __init__(self, cfg: DecoderConfig, ffn_dim: int) -> None:
        super().__init__()
        self.proj_1 = Linear(cfg.d_model, 2 * ffn_dim, std=cfg.d_model ** -0.5)
        self.proj_2 = Linear(ffn_dim, cfg.d_model, std=cfg.output_std(ffn_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_2(ops.swiglu(self.proj_1(x)))


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig, shape: LayerShape) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, shape)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = FeedForward(cfg, shape.ffn_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: Any, layer: int) -> torch.Tensor:
        h = x + self.attn(self.attn_norm(x), cos, sin, cache, layer)
        return h + self.ffn(self.ffn_norm(h))


class Decoder(nn.Module):
    """tokens (B, T) -> logits (B, T, vocab_rows). With a `KVCache`, keys/values are appended to it and positions
    continue from the tokens it has seen."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = Embedding(cfg.rows, cfg.d_model, std=cfg.d_model ** -0.5)
        self.layers = nn.ModuleList(Block(cfg, s) for s in cfg.layer_shapes())
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = Linear(cfg.d_model, cfg.rows, std=cfg.d_model ** -0.5)
        streams = cfg.streams
        if streams is not None:  # P_1..P_γ, and o_θ
            self.stream_embed = nn.Parameter(torch.randn(streams.gamma, cfg.d_model) * streams.embedding_std)
        self.prune_adapter = PruningAdapter(cfg.d_model, streams.pruning_rank) if streams and streams.pruning_rank \
            else None
        self.tie_weights()
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.register_buffer("rope_inv_freq", torch.empty(0), persistent=False)  # for real-valued positions
        self.init_buffers()
        self.activation_checkpointing = False

    def init_buffers(self) -> None:
        """(Re)compute the fp32 RoPE tables: after building on the meta device, or after casting the model."""
        cos, sin = rope_tables(self.cfg.head_dim, self.cfg.max_positions, self.cfg.rope_theta)
        device = self.embed.weight.device
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)
        self.rope_inv_freq = rope_frequencies(self.cfg.head_dim, self.cfg.rope_theta).to(device)

    def tie_weights(self) -> None:
        if self.cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None, positions: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """`last_only` computes the logits of the final position alone (all a prefill needs)."""
        x = self.hidden(tokens, cache, positions)
        return self.logits(x[:, -1:] if last_only else x)  # (B, T or 1, vocab_rows)

    def hidden(self, tokens: torch.Tensor, cache: KVCache | None = None,
               positions: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) -> final hidden states (B, T, d), before the output norm and head. `positions` (B, T) may be
        real-valued (superposition prompting's equilibrium positions)."""
        T = tokens.shape[1]
        if positions is None and cache is not None:
            positions = cache.position_ids(T)
        if positions is None:  # contiguous positions: a slice of the tables, no gather
            start = cache.seen if cache is not None else 0
            cos, sin = self.rope_cos[None, None, start:start + T], self.rope_sin[None, None, start:start + T]
        else:
            cos, sin = self.rope(positions)
        x = self.run_layers(self.embed(tokens), cos, sin, cache, range(len(self.layers)))  # (B, T, d)
        if cache is not None:
            cache.advance(T)
        return x

    def run_layers(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: Any,
                   layers: range) -> torch.Tensor:
        for i in layers:
            block = self.layers[i]
            if self.activation_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, cache, i, use_reentrant=False)
            else:
                x = block(x, cos, sin, cache, i)
        return x

    def forward_streams(self, tokens: torch.Tensor, cache: Any = None, positions: torch.Tensor | None = None,
                        stream_rows: torch.Tensor | None = None, prune: Any = None) -> StreamStates:
        """Main and speculative streams (spec 2.1): tokens (B, T) at `positions` (B, T) (default 0..T-1) through
        the lower layers, then the MSA layers with γ streams on each of the `stream_rows` (B, R) (default: every
        row). `cache` is a `CachedAttention` (main-stream K/V only; None = causal over the input). `prune(early_exit)`
        may return the (B, T') rows that go on into the MSA layers (tree pruning); then `stream_rows` index those."""
        B, T = tokens.shape
        first = len(self.layers) - self.cfg.streams.msa_layers
        if positions is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        cos, sin = self.rope(positions)
        x = self.run_layers(self.embed(tokens), cos, sin, cache, range(first))  # the residual entering layer `first`
        early_exit = self.prune_adapter(x.detach()) if self.prune_adapter is not None else None
        rows = prune(early_exit) if prune is not None else None
        if rows is not None:
            x = x.gather(1, rows[..., None].expand(-1, -1, x.shape[-1]))
            positions = positions.gather(1, rows)
        n_main = x.shape[1]
        if stream_rows is None:
            stream_rows = torch.arange(n_main, device=x.device).expand(B, n_main)
        gamma = self.stream_embed.shape[0]
        anchors = x.gather(1, stream_rows[..., None].expand(-1, -1, x.shape[-1]))  # (B, R, d)
        streams = anchors[:, :, None] + self.stream_embed  # S_j = M + P_j: (B, R, γ, d)
        h = torch.cat([x, streams.flatten(1, 2)], dim=1)  # (B, T' + R·γ, d)
        stream_positions = positions.gather(1, stream_rows).repeat_interleave(gamma, dim=1)  # a stream sits at its row
        cos, sin = self.rope(torch.cat([positions, stream_positions], dim=1))
        h = self.run_layers(h, cos, sin, MultiStreamAttention(cache, n_main, stream_rows, gamma),
                            range(first, len(self.layers)))
        return StreamStates(h[:, :n_main], h[:, n_main:].unflatten(1, (stream_rows.shape[1], gamma)), early_exit,
                            rows)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (B, 1, T, hd) for explicit (B, T) position ids (padded batches, pruned token sets).
        Real-valued positions get their angles computed in fp32 (pos * inv_freq, no table, no rounding); at integer
        values these equal the table's. (The frequencies are a buffer: a decode step captured as a CUDA graph may
        not copy from the host.)"""
        if positions.is_floating_point():
            cos, sin = rope_angles(positions, self.rope_inv_freq)
            return cos[:, None], sin[:, None]
        return self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x))

    def param_counts(self) -> dict[str, int]:
        total = sum(p.numel() for p in self.parameters())
        embedding = self.embed.weight.numel()
        return {"params_total": total, "params_embedding": embedding, "params_non_embedding": total - embedding}


def training_flops_per_token(cfg: DecoderConfig, seq_len: int) -> float:
    """Forward + backward FLOPs per token: 6 per weight that multiplies activations (every layer weight and the
    output head; the embedding lookup is free) plus attention scores and values, 12 * T * n_q * hd per layer
    (PaLM appendix B; causal masking not discounted)."""
    d, hd = cfg.d_model, cfg.head_dim
    weights = sum(d * (s.q_heads + 2 * s.kv_heads) * hd + s.q_heads * hd * d + 3 * d * s.ffn_dim
                  for s in cfg.layer_shapes()) + cfg.rows * d
    attention = sum(12 * seq_len * s.q_heads * hd for s in cfg.layer_shapes())
    return 6 * weights + attention


def build_decoder(cfg: DecoderConfig, device: torch.device | str | None = None) -> Decoder:
    """Build on `device` ("meta" builds shapes only, instantly, whatever the size)."""
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return Decoder(cfg)
