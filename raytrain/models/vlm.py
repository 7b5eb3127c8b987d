"""A LLaVA-style vision-language model with Victor's visual registers (plain PyTorch, no Ray).

image tower (the project's ViT: patch tokens of an inner block, CLS dropped) -> 2-layer MLP projector -> the decoder
family over `[text before the image ; visual tokens ; registers ; text after the image]`, spliced per row where the
row's `image_at` says (spec `victor.md`, trap 1: the image never has to come first).

Victor (Wen et al., arXiv 2410.14072): M learned register embeddings follow each visual span. Layers 0..k-1 run on
the whole sequence; at the input of layer k every visual token is deleted (hidden state, position, label, and so
every later layer's keys and values), and layers k..n-1 run on the text and the registers, which summarised the image
under the causal mask. The registers are one learned (M, d) weight (`register_init` normal, zeros, or
`image_token`: every row the embedding of the word "Image", set by the task that knows the tokenizer), or with
`pooled` that weight (zeros at init) plus the image's own visual tokens average-pooled into M regions, so that they
start from a summary of the image and differ between images. Survivors keep their original position ids
(`position_ids: keep`; `renumber` makes them contiguous). The drop is a gather: each row keeps its surviving tokens
in order and the rows are re-padded at the end, so the attention mask is rebuilt from validity alone, and when no row
is padded there is no mask at all and SDPA runs its causal (flash) kernels.

`victor.mode`: `off` (the LLaVA baseline: every visual token in every layer), `registers` (Victor;
`drop_layer >= n_layers` keeps every visual token: registers without the drop), `keep_last_visual` (the paper's
ablation: no registers, the last `keep_visual` visual tokens survive layer k) and `fastv` (FastV, arXiv 2403.06764:
no registers, the `keep_visual` visual tokens that received the most attention in layer k-1, averaged over heads and
queries, survive; ranking them needs layer k-1's attention map, computed eagerly).

Generation (`raytrain/infer/vlm.py`) prefills through `forward` with a `VLMCache`, whose layers each keep their own
token set (layers < k the whole sequence, layers >= k the survivors), then calls `decode` once per new token.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from raytrain.models.decoder import Decoder, DecoderConfig
from raytrain.models.kv_cache import attention
from raytrain.models.vit import PATCH, ViT, ViTConfig

IGNORE = -100  # label of a position that is not supervised
MODES = ("off", "registers", "keep_last_visual", "fastv")
REGISTER_INITS = ("normal", "zeros", "pooled", "image_token")
TEXT, VISUAL, REGISTER = 1, 2, 3  # token kinds in a spliced row (0: padding)


@dataclass
class VictorConfig:
    mode: str = "registers"  # off | registers | keep_last_visual | fastv
    num_registers: int = 8  # M (mode=registers)
    drop_layer: int = 3  # k: visual tokens are gone from the input of this layer on; >= n_layers: never dropped
    keep_visual: int = 8  # keep_last_visual / fastv: visual tokens that survive layer k
    register_init: str = "normal"  # normal (std register_init_std) | zeros | pooled (input-dependent, see Registers)
    # | image_token (every row the mean embedding of register_init_word's tokens: VLM.init_registers_from_tokens)
    register_init_std: float = 0.02
    register_init_word: str = "Image"
    position_ids: str = "keep"  # keep (original positions after the drop) | renumber (contiguous after it)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}; expected one of {', '.join(MODES)}")
        if self.drop_layer < 1:
            raise ValueError(f"drop_layer={self.drop_layer} must be >= 1: at layer 0 the registers (or FastV's "
                             "ranking) have seen nothing of the image")
        if self.mode == "registers" and self.num_registers < 1:
            raise ValueError(f"num_registers={self.num_registers} must be >= 1 with mode=registers (mode=off is "
                             "the baseline without registers)")
        if self.keep_visual < 0:
            raise ValueError(f"keep_visual={self.keep_visual} must be >= 0")
        if self.register_init not in REGISTER_INITS:
            raise ValueError(f"register_init={self.register_init!r}; expected one of {', '.join(REGISTER_INITS)}")
        if self.position_ids not in ("keep", "renumber"):
            raise ValueError(f"position_ids={self.position_ids!r}; expected keep or renumber")

    @property
    def registers(self) -> int:
        return self.num_registers if self.mode == "registers" else 0


def _vicuna_7b() -> DecoderConfig:
    return DecoderConfig(name="vicuna_7b", vocab_size=32000, d_model=4096, n_layers=32, head_dim=128, q_heads=32,
                         kv_heads=32, ffn_dim=11008, max_seq_len=4096, qk_norm=False, tie_embeddings=False)


@dataclass
class VLMConfig:
    name: str = "vlm"
    image: ViTConfig = field(default_factory=lambda: ViTConfig(num_classes=0, image_size=384))  # 24 x 24 patches
    decoder: DecoderConfig = field(default_factory=_vicuna_7b)
    image_layer: int = -2  # visual tokens are the patch tokens after this many ViT blocks (< 0: counted from the
    # end, LLaVA's penultimate layer at -2), without the final norm
    victor: VictorConfig = field(default_factory=VictorConfig)

    def __post_init__(self) -> None:
        if self.image.num_classes:
            raise ValueError("image.num_classes must be 0: the image tower has no classifier")
        if not -self.image.n_layers <= self.image_layer <= self.image.n_layers or self.image_layer == 0:
            raise ValueError(f"image_layer={self.image_layer} is not a block of the {self.image.n_layers}-block "
                             "image tower (1..n, or -n..-1 from the end)")

    @property
    def vocab_size(self) -> int:
        """The text vocabulary (the decoder's)."""
        return self.decoder.vocab_size

    @property
    def visual_tokens(self) -> int:
        """N, visual tokens per image at the tower's training resolution."""
        return (self.image.image_size // PATCH) ** 2

    @property
    def image_blocks(self) -> int:
        return self.image_layer if self.image_layer > 0 else self.image.n_layers + 1 + self.image_layer


class Projector(nn.Module):
    """LLaVA-1.5's `mlp2x_gelu`: Linear(d_image, d) -> GELU -> Linear(d, d)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_out)
        self.fc2 = nn.Linear(d_out, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Registers(nn.Module):
    """The M register embeddings that follow each image: the learned weight itself, or with `init: pooled` the
    image's visual tokens pooled into M regions (`pool_visual`) plus the weight, which starts at zeros so that the
    registers start as exactly the pooled tokens (spec 2.6: the paper's input-dependent variant). A module whose
    forward is called (not a bare parameter read), so that ZeRO-3 gathers the partitioned weight before it is used
    (spec trap 9); it is called once per batch, whatever the rows."""

    def __init__(self, count: int, dim: int, init: str, std: float) -> None:
        super().__init__()
        self.init, self.std = init, std
        self.weight = nn.Parameter(torch.empty(count, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.init in ("zeros", "pooled", "image_token"):  # image_token: zeros until its embedding is copied in
            nn.init.zeros_(self.weight)
        else:
            nn.init.normal_(self.weight, std=self.std)

    def forward(self, visual: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """Each row's (N_b, d) visual tokens (None: a text-only row) -> its (M, d) register inputs (None there)."""
        if self.init == "pooled":
            return [pool_visual(v, len(self.weight)) + self.weight if v is not None else None for v in visual]
        return [self.weight if v is not None else None for v in visual]


def pool_visual(visual: torch.Tensor, groups: int) -> torch.Tensor:
    """(N, d) visual tokens -> (groups, d) means of contiguous regions. When N is a square, the tokens are the tower's
    patch grid in row-major order, so the regions are an r x c grid of rectangles (r * c = groups, r the largest
    divisor of `groups` not above its square root; 8 on 8 x 8 patches: 2 x 4 regions of 4 x 2 patches), in row-major
    order; otherwise they are contiguous chunks of the sequence. Both use PyTorch's adaptive average pooling: equal,
    disjoint bins where the sizes divide, else neighbouring bins share a token (never an empty one)."""
    n, d = visual.shape
    side = math.isqrt(n)
    if side * side == n:
        rows = max(r for r in range(1, math.isqrt(groups) + 1) if groups % r == 0)
        grid = visual.T.reshape(1, d, side, side)
        return F.adaptive_avg_pool2d(grid, (rows, groups // rows)).reshape(d, groups).T
    return F.adaptive_avg_pool1d(visual.T[None], groups)[0].T


@dataclass
class VLMBatch:
    """Text rows and where each row's image goes. Padding may sit on either side of the text."""

    tokens: torch.Tensor  # (B, L) text token ids
    text_mask: torch.Tensor  # (B, L) bool: True on real text tokens
    image_at: torch.Tensor  # (B,) index into `tokens` before which the image span is spliced; -1: a text-only row
    images: torch.Tensor | None = None  # (B, 3, H, W) pixels in [0, 1]
    visual: list[torch.Tensor | None] | None = None  # or each row's projected visual tokens (N_b, d) directly
    labels: torch.Tensor | None = None  # (B, L) the id each text position holds where supervised, IGNORE elsewhere


@dataclass
class TokenSet:
    """What is known of the tokens a layer runs on, (B, S) each: rows padded at their ends."""

    positions: torch.Tensor  # RoPE position ids
    valid: torch.Tensor  # False on padding
    visual: torch.Tensor  # True inside an image span
    labels: torch.Tensor  # targets, IGNORE where unsupervised
    index: torch.Tensor  # each token's index in the spliced row (what survived a drop)

    def select(self, keep: torch.Tensor) -> tuple[TokenSet, torch.Tensor]:
        """The tokens where `keep` (B, S) holds, in order, rows padded to the longest; and the gather index (B, S')."""
        counts = keep.sum(1)
        order = torch.sort((~keep).int(), dim=1, stable=True).indices[:, :int(counts.max())]  # kept first, in order
        valid = torch.arange(order.shape[1], device=keep.device)[None] < counts[:, None]
        take = lambda t: t.gather(1, order)  # noqa: E731
        selected = TokenSet(take(self.positions), valid, take(self.visual) & valid,
                            take(self.labels).masked_fill(~valid, IGNORE), take(self.index))
        return selected, order

    def renumbered(self) -> TokenSet:
        positions = (self.valid.long().cumsum(1) - 1).clamp_min(0)
        return TokenSet(positions, self.valid, self.visual, self.labels, self.index)

    def last(self) -> torch.Tensor:
        """(B,) index of each row's last real token."""
        return self.valid.long().cumsum(1).argmax(1)


@dataclass
class VLMOutput:
    hidden: torch.Tensor  # (B, S', d) last layer's states of the tokens that reached it (before the final norm)
    tokens: TokenSet  # what they are
    loss: torch.Tensor | None = None  # next-token cross-entropy over the supervised positions (with labels)


class VLM(nn.Module):
    def __init__(self, cfg: VLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.image = ViT(cfg.image)
        self.projector = Projector(cfg.image.d_model, cfg.decoder.d_model)
        v = cfg.victor
        self.registers = Registers(v.registers, cfg.decoder.d_model, v.register_init, v.register_init_std) \
            if v.registers else None
        self.decoder = Decoder(cfg.decoder)

    # ---- what the trainer, checkpoints and model-info use ------------------------------------------------------

    @property
    def layers(self) -> nn.ModuleList:
        """The decoder blocks (compilation and activation checkpointing act on them)."""
        return self.decoder.layers

    @property
    def activation_checkpointing(self) -> bool:
        return self.decoder.activation_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, on: bool) -> None:
        self.decoder.activation_checkpointing = self.image.activation_checkpointing = on

    def init_buffers(self) -> None:
        self.decoder.init_buffers()

    def tie_weights(self) -> None:
        self.decoder.tie_weights()

    def param_counts(self) -> dict[str, int]:
        count = lambda m: sum(p.numel() for p in m.parameters()) if m is not None else 0  # noqa: E731
        return {"params_total": count(self), "params_image": count(self.image),
                "params_projector": count(self.projector), "params_registers": count(self.registers),
                "params_decoder": count(self.decoder)}

    @torch.no_grad()
    def init_registers_from_tokens(self, token_ids: list[int]) -> None:
        """`register_init: image_token` (spec 2.6): every register row becomes the mean of the decoder's input
        embeddings of `token_ids` (the tokenized `register_init_word`); called once the decoder's weights are in."""
        if self.registers is None or not token_ids:
            raise ValueError("init_registers_from_tokens needs registers (mode=registers) and at least one token id")
        word = self.decoder.embed.weight[token_ids].mean(0)
        self.registers.weight.copy_(word.expand_as(self.registers.weight))

    @property
    def drop_layer(self) -> int | None:
        """The layer at whose input visual tokens are dropped, or None if they never are."""
        v = self.cfg.victor
        return v.drop_layer if v.mode != "off" and v.drop_layer < self.cfg.decoder.n_layers else None

    # ---- the sequence ------------------------------------------------------------------------------------------

    def visual_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels -> (B, N, d) projected patch tokens of block `image_layer`, CLS dropped."""
        patches = self.image.tokens(images, self.cfg.image_blocks)[:, 1:]  # (B, N, d_image)
        return self.projector(patches)

    def splice(self, batch: VLMBatch) -> tuple[torch.Tensor, TokenSet]:
        """Embeddings (B, S, d) of `[text before ; visual ; registers ; text after]` per row, padded at the end, and
        their positions (left padding aware: the first real token is position 0), kinds and labels."""
        text = self.decoder.embed(batch.tokens)  # (B, L, d)
        visual = self.image_spans(batch, text.dtype)
        registers = self.registers(visual) if self.registers is not None else [None] * len(visual)
        labels = batch.labels if batch.labels is not None else torch.full_like(batch.tokens, IGNORE)
        kinds = torch.where(batch.text_mask, TEXT, 0)
        rows = []
        for b, at in enumerate(batch.image_at.tolist()):
            if at < 0:
                rows.append((text[b], kinds[b], labels[b]))
                continue
            own = registers[b].to(text.dtype) if registers[b] is not None else text[b, :0]  # (M, d)
            span = torch.cat([visual[b], own])  # (N_b + M, d)
            span_kinds = torch.tensor([VISUAL] * len(visual[b]) + [REGISTER] * len(own), device=text.device)
            rows.append((torch.cat([text[b, :at], span, text[b, at:]]),
                         torch.cat([kinds[b, :at], span_kinds, kinds[b, at:]]),
                         torch.cat([labels[b, :at], labels.new_full((len(span),), IGNORE), labels[b, at:]])))
        hidden, kind, label = (nn.utils.rnn.pad_sequence(list(part), batch_first=True, padding_value=pad)
                               for part, pad in zip(zip(*rows), (0.0, 0, IGNORE)))
        valid = kind > 0
        index = torch.arange(kind.shape[1], device=kind.device).expand_as(kind)
        positions = (valid.long().cumsum(1) - 1).clamp_min(0)
        return hidden, TokenSet(positions, valid, kind == VISUAL, label.masked_fill(~valid, IGNORE), index)

    def image_spans(self, batch: VLMBatch, dtype: torch.dtype) -> list[torch.Tensor | None]:
        """Each row's projected visual tokens (N_b, d) in `dtype`; None for a text-only row."""
        visual = batch.visual if batch.visual is not None else (
            self.visual_tokens(batch.images) if batch.images is not None else None)
        spans = []
        for b, at in enumerate(batch.image_at.tolist()):
            if at >= 0 and (visual is None or visual[b] is None):
                raise ValueError(f"row {b} has an image position but no image")
            spans.append(visual[b].to(dtype) if at >= 0 else None)
        return spans

    def keep_at_drop(self, tokens: TokenSet, received: torch.Tensor | None) -> torch.Tensor:
        """(B, S) bool: the tokens that go on to layer k (text and registers; for the ablations some visual ones)."""
        keep = tokens.valid & ~tokens.visual
        v = self.cfg.victor
        if v.mode in ("keep_last_visual", "fastv") and v.keep_visual:
            score = received if v.mode == "fastv" else tokens.index.float()
            score = score.masked_fill(~(tokens.visual & tokens.valid), float("-inf"))
            top = score.topk(min(v.keep_visual, score.shape[1]), dim=1).indices
            keep |= torch.zeros_like(keep).scatter(1, top, True) & tokens.visual & tokens.valid
        return keep

    # ---- forward -------------------------------------------------------------------------------------------------

    def forward(self, batch: VLMBatch, cache: VLMCache | None = None) -> VLMOutput:
        """The whole sequence through every layer (training, and generation's prefill when `cache` is given)."""
        h, tokens = self.splice(batch)
        drop = self.drop_layer
        score_layer = drop - 1 if drop is not None and self.cfg.victor.mode == "fastv" else None
        attend = SequenceAttention(tokens, cache, score_layer)
        cos, sin = self.decoder.rope(tokens.positions)
        for i, block in enumerate(self.decoder.layers):
            if i == drop:
                tokens, order = tokens.select(self.keep_at_drop(tokens, attend.received))
                if self.cfg.victor.position_ids == "renumber":
                    tokens = tokens.renumbered()
                h = h.gather(1, order[..., None].expand(-1, -1, h.shape[-1]))
                attend = SequenceAttention(tokens, cache)
                cos, sin = self.decoder.rope(tokens.positions)
            if self.decoder.activation_checkpointing and self.training:
                h = torch.utils.checkpoint.checkpoint(block, h, cos, sin, attend, i, use_reentrant=False)
            else:
                h = block(h, cos, sin, attend, i)
        loss = self.lm_loss(h, tokens) if batch.labels is not None else None
        return VLMOutput(h, tokens, loss)

    def lm_loss(self, hidden: torch.Tensor, tokens: TokenSet) -> torch.Tensor:
        """Mean cross-entropy of the next token where it is supervised: labels were gathered with the hidden states,
        then shifted (spec trap 5); the vocabulary projection runs on those positions only."""
        targets = tokens.labels[:, 1:]
        supervised = (targets != IGNORE) & tokens.valid[:, :-1]
        logits = self.decoder.logits(hidden[:, :-1][supervised])  # (n, V)
        loss = F.cross_entropy(logits.float(), targets[supervised], reduction="sum")
        return loss / supervised.sum().clamp_min(1)

    def logits(self, out: VLMOutput) -> torch.Tensor:
        return self.decoder.logits(out.hidden)  # (B, S', V)

    def decode(self, tokens: torch.Tensor, cache: VLMCache) -> torch.Tensor:
        """tokens (B,) -> next-token logits (B, V): one step, every layer attending to its own cache."""
        h = self.decoder.embed(tokens[:, None])  # (B, 1, d)
        for i, block in enumerate(self.decoder.layers):
            cos, sin = self.decoder.rope(cache.next_positions[i][:, None])
            h = block(h, cos, sin, cache, i)
        cache.advance()
        return self.decoder.logits(h[:, -1])


class SequenceAttention:
    """Attention over one token set of whole rows (the decoder's cache protocol): causal by index with padded keys
    hidden, or SDPA's own causal flag when nothing is padded. With a `VLMCache` it also stores every layer's keys
    and values; at `score_layer` it records the attention each key received (FastV's ranking)."""

    def __init__(self, tokens: TokenSet, cache: VLMCache | None = None, score_layer: int | None = None) -> None:
        self.tokens, self.cache, self.score_layer = tokens, cache, score_layer
        self.mask = None if bool(tokens.valid.all()) else padded_causal_mask(tokens.valid)
        self.received: torch.Tensor | None = None

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.cache is not None:
            self.cache.prefill(layer, k, v, self.tokens)
        if layer == self.score_layer:
            self.received = received_attention(q, k, self.mask, self.tokens.valid)
        return attention(q, k, v, self.mask, self.mask is None)


def padded_causal_mask(valid: torch.Tensor) -> torch.Tensor:
    """(B, 1, S, S): key j visible to query i when j <= i and j is real; a padded query sees itself (no empty row)."""
    S = valid.shape[1]
    causal = torch.ones(S, S, dtype=torch.bool, device=valid.device).tril()
    eye = torch.eye(S, dtype=torch.bool, device=valid.device)
    return ((causal[None] & valid[:, None, :]) | eye[None])[:, None]


def received_attention(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None,
                       valid: torch.Tensor) -> torch.Tensor:
    """(B, S): the attention probability each key receives, averaged over query heads and real queries. Builds the
    (B, n_q, S, S) map, which is why FastV needs eager attention in this layer."""
    n_q, n_kv, S, hd = q.shape[1], k.shape[1], q.shape[2], q.shape[3]
    keys = k.repeat_interleave(n_q // n_kv, dim=1)  # query heads g*j..g*j+g-1 read KV head j
    scores = torch.matmul(q.float(), keys.float().transpose(-1, -2)) / math.sqrt(hd)  # (B, n_q, S, S)
    visible = mask if mask is not None else torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    queries = valid[:, None, :, None].float()
    return (probs * queries).sum((1, 2)) / (n_q * valid.sum(1, keepdim=True).clamp_min(1))


class VLMCache:
    """Keys and values of a batch, every layer its own token set: after a prefill, layers < k hold each row's
    whole spliced sequence and layers >= k only what survived the drop (spec 2.4), so lengths differ per layer.
    Entries are (B, n_kv, capacity, hd) with a validity mask per row; each decode step appends one entry to every
    layer at that layer's own length, at the position that follows the row's last one in that layer."""

    def __init__(self, n_layers: int, capacity: int) -> None:
        self.capacity = capacity
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self.valid: list[torch.Tensor | None] = [None] * n_layers  # (B, capacity) bool
        self.lengths = [0] * n_layers  # entries filled (the same for every row; shorter rows hold padding)
        self.next_positions: list[torch.Tensor | None] = [None] * n_layers  # (B,) position of the next token

    def prefill(self, layer: int, k: torch.Tensor, v: torch.Tensor, tokens: TokenSet) -> None:
        B, H, T, D = k.shape
        if T >= self.capacity:
            raise ValueError(f"VLM cache holds {self.capacity} tokens; layer {layer} needs {T} and more")
        self.keys[layer] = k.new_zeros(B, H, self.capacity, D)
        self.values[layer] = v.new_zeros(B, H, self.capacity, D)
        self.keys[layer][:, :, :T], self.values[layer][:, :, :T] = k, v
        self.valid[layer] = tokens.valid.new_zeros(B, self.capacity)
        self.valid[layer][:, :T] = tokens.valid
        self.lengths[layer] = T
        self.next_positions[layer] = tokens.positions.masked_fill(~tokens.valid, -1).amax(1) + 1

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Decode: append this step's k, v (B, n_kv, 1, hd) to `layer` and attend over its real entries."""
        n = self.lengths[layer]
        if n >= self.capacity:
            raise ValueError(f"VLM cache holds {self.capacity} tokens; layer {layer} is full")
        K, V, valid = self.keys[layer], self.values[layer], self.valid[layer]
        K[:, :, n], V[:, :, n] = k[:, :, 0], v[:, :, 0]
        valid[:, n] = True
        self.lengths[layer] = n + 1
        return attention(q, K[:, :, :n + 1], V[:, :, :n + 1], valid[:, None, None, :n + 1], False)

    def advance(self) -> None:
        for positions in self.next_positions:
            positions += 1

    def kv_lengths(self, layer: int) -> torch.Tensor:
        """(B,) real entries each row holds in `layer`."""
        return self.valid[layer][:, :self.lengths[layer]].sum(1)


def build_vlm(cfg: VLMConfig, device: torch.device | str | None = None) -> VLM:
    """Build on `device` ("meta" builds shapes only)."""
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return VLM(cfg)
