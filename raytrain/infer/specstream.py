"""Speculative Streaming decoding (spec 2.3): one forward pass verifies the previous draft tree and drafts the next.

A sequence decoding speculatively holds a root (its newest token, already final: emitted, or the prompt's last;
its KV not yet written) and a draft: the top-K tokens of each of its γ streams at the last accepted position. A step:

1. builds the full k-ary tree of depth γ under the root (depth-g nodes are the top-k tokens of stream g, the same
   k under every parent), flattened in BFS order; node i sits at position ctx + depth(i);
2. runs it through the model (`Decoder.forward_streams`) over the slot KV cache: every node attends to the
   committed KV, its ancestors and itself (`TreeKV`), its K/V written after the committed context; with tree
   pruning, the early-exit head at the first MSA layer drops every node whose token is unlikely under its parent
   (probability below τ), with its subtree, before the MSA layers;
3. accepts the longest root-to-node path whose every token is the main stream's argmax at its parent (greedy, so
   the output is the output of greedy decoding), commits root + δ accepted tokens by moving their K/V, layer by
   layer, to ctx..ctx+δ in path order (the other nodes' K/V stay past the committed length, never read, overwritten
   by the next tree); stream K/V are never written;
4. emits the δ accepted tokens and the new root, the argmax at the last accepted node, and takes the next draft
   from that node's streams.

A speculating prompt is prefilled like any other (packed, a CUDA graph on the GPU) but for its last token, which
roots the first tree under a draft of zeros: that step yields the first token and the first real draft. Several
sequences speculate in one batched step (one tree each, all of one shape); when their trees together would exceed
`max_step_rows` MSA rows, the step narrows every tree to k = 1. Only greedy requests without a repetition penalty
speculate; others decode plainly beside them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from raytrain.config import ConfigError
from raytrain.infer.kv_cache import SlotKVCache
from raytrain.infer.model_runner import ModelRunner, bucket
from raytrain.infer.sampling import SamplingParams
from raytrain.models.decoder import Decoder
from raytrain.models.kv_cache import CachedAttention
from raytrain.models.streams import tree_size


@dataclass
class SpecStreamConfig:
    gamma: int | None = None  # tree depth: streams used for drafting (at most the model's); None = all of them
    top_k: int = 2  # tree width k: each stream's k most likely tokens
    prune_threshold: float = 0.0  # τ: drop draft nodes below this early-exit probability under their parent; 0 = off
    max_step_rows: int = 512  # MSA rows of all speculating sequences in one step; above it, trees narrow to k = 1
    graph_width: int = 8  # on CUDA, steps of up to this many speculating sequences run as CUDA graphs; more, eager

    def __post_init__(self) -> None:
        if self.gamma is not None and self.gamma < 1:
            raise ValueError(f"specstream.gamma={self.gamma} must be >= 1 (or null: every stream of the model)")
        if self.top_k < 1:
            raise ValueError(f"specstream.top_k={self.top_k} must be >= 1")
        if not 0.0 <= self.prune_threshold <= 1.0:
            raise ValueError(f"specstream.prune_threshold={self.prune_threshold} must be in [0, 1]")
        if self.max_step_rows < 1:
            raise ValueError(f"specstream.max_step_rows={self.max_step_rows} must be >= 1")
        if self.graph_width < 0:
            raise ValueError(f"specstream.graph_width={self.graph_width} must be >= 0")


# ---- the tree ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tree:
    """Draft nodes in BFS order (node 0 the root): depth, parent (the root's is 0), rank (which of the k tokens of
    its depth a node carries) and `ancestors` (n, n) bool, True where node i sees node j (its ancestors and
    itself); `levels` = the deepest depth + 1 (kept on the host: a captured step may not read the device)."""

    depth: torch.Tensor
    parent: torch.Tensor
    rank: torch.Tensor
    ancestors: torch.Tensor
    levels: int

    @property
    def size(self) -> int:
        return self.depth.numel()

    @property
    def is_chain(self) -> bool:
        """k = 1: node i is at depth i, so any accepted path is a prefix of the rows, its K/V already in place."""
        return self.levels == self.size


def build_tree(gamma: int, k: int, device: torch.device | str = "cpu") -> Tree:
    """The full k-ary tree of depth γ: the k tokens of depth g repeat under every node of depth g - 1."""
    depth, parent, rank, level = [0], [0], [0], [0]
    for g in range(1, gamma + 1):
        below = []
        for p in level:
            for r in range(k):
                below.append(len(depth))
                depth.append(g)
                parent.append(p)
                rank.append(r)
        level = below
    return _tree(depth, parent, rank, device)


def _tree(depth: list[int], parent: list[int], rank: list[int], device: torch.device | str) -> Tree:
    n = len(depth)
    ancestors = torch.eye(n, dtype=torch.bool)
    for i in range(1, n):  # parents precede children in BFS order
        ancestors[i] |= ancestors[parent[i]]
    as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
    return Tree(as_tensor(depth), as_tensor(parent), as_tensor(rank), ancestors.to(device), depth[-1] + 1)


def tree_tokens(tree: Tree, roots: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
    """roots (W,), drafts (W, γ, K) -> the tokens of every node (W, n)."""
    table = torch.cat([roots[:, None, None].expand(-1, 1, drafts.shape[2]), drafts], dim=1)  # (W, 1 + γ, K)
    return table[:, tree.depth, tree.rank]


def accept(tree: Tree, tokens: torch.Tensor, greedy: torch.Tensor,
           alive: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The longest root-to-node path whose every node carries the argmax of its parent (on the device, no sync).

    tokens, greedy (W, n): each node's token and the argmax of the main stream at it; alive (W, n): nodes not
    pruned. -> path (W, levels): the accepted nodes by depth, entries past δ repeating the last accepted node;
    accepted (W,) = δ. Siblings carry distinct tokens, so at most one child of a node can match."""
    match = tokens == greedy.gather(1, tree.parent.expand_as(tokens))
    if alive is not None:
        match &= alive
    match[:, 0] = True
    on_path = ~((~match)[:, None, :] & tree.ancestors).any(-1)  # every node from the root down to it matches
    levels = torch.arange(tree.levels, device=tokens.device)
    at_depth = on_path[:, None, :] & (tree.depth[None, None, :] == levels[None, :, None])  # (W, levels, n)
    found = at_depth.any(-1)
    accepted = found.sum(-1) - 1
    nodes = at_depth.int().argmax(-1)
    return torch.where(found, nodes, nodes.gather(1, accepted[:, None])), accepted


def surviving(tree: Tree, tokens: torch.Tensor, parent_probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """Tree pruning (spec 2.3): parent_probs (W, n_internal, V) the early-exit distributions at the internal nodes
    (every node above the deepest level; BFS puts them first) -> (W, n) bool, False for a node whose token has
    probability below `threshold` under its parent, and for its whole subtree. The root always survives."""
    batch = torch.arange(tokens.shape[0], device=tokens.device)[:, None]
    passes = parent_probs[batch, tree.parent, tokens] >= threshold  # (W, n): each token's probability under its parent
    passes[:, 0] = True
    return ~((~passes)[:, None, :] & tree.ancestors).any(-1)


# ---- attention over the slots ------------------------------------------------------------------------------------

class TreeKV(CachedAttention):
    """Tree rows over the engine's slot KV cache: W sequences in `slots` (W,), each with `ctx` (W,) committed
    tokens; row i of sequence w writes its K/V at ctx[w] + i and sees the committed KV and the rows its mask
    allows, among the first `length` keys of its slot (at least ctx + rows for every sequence). `use_rows` sets the
    rows of the layers that follow (pruning changes them at the first MSA layer); `commit` moves the accepted rows'
    K/V into place in every layer."""

    def __init__(self, cache: SlotKVCache, slots: torch.Tensor, ctx: torch.Tensor, length: int) -> None:
        self.cache, self.slots, self.ctx, self.length = cache, slots, ctx, length
        self.row_of: dict[int, torch.Tensor] = {}  # layer -> (W, n) the row each tree node had there

    def use_rows(self, sees: torch.Tensor, row_of: torch.Tensor) -> None:
        """sees (W or 1, m, m) bool: which rows each row attends to; row_of (W, n): each node's row (ignored for
        nodes that have none)."""
        W, m, length = self.slots.numel(), sees.shape[-1], self.length
        rel = torch.arange(length, device=sees.device)[None, :] - self.ctx[:, None]  # (W, L): key - ctx
        in_tree = (rel >= 0) & (rel < m)
        tree_keys = sees.expand(W, m, m).gather(2, rel.clamp(0, m - 1)[:, None, :].expand(W, m, length))
        self.mask = ((rel < 0)[:, None, :] | (tree_keys & in_tree[:, None, :]))[:, None]  # (W, 1, m, L)
        self.sees = sees.to(torch.int8)  # what the Triton tree attention reads
        self.write = self.ctx[:, None] + torch.arange(m, device=sees.device)  # (W, m)
        self.rows = row_of

    def update(self, layer: int, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
        """k, v (W, n_kv, m, hd) of this layer's rows -> the first `length` keys and values of the W slots."""
        K, V = self.cache.keys[layer], self.cache.values[layer]
        K[self.slots[:, None], :, self.write] = k.transpose(1, 2)
        V[self.slots[:, None], :, self.write] = v.transpose(1, 2)
        self.row_of[layer] = self.rows
        keys = K[:, :, :self.length].index_select(0, self.slots)
        values = V[:, :, :self.length].index_select(0, self.slots)
        return keys, values, self.mask, False

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """A layer without streams: with the cache's Triton kernels (CUDA), the K/V writes and the attention are one
        launch; else the writes, a gather of the slots' keys and masked SDPA."""
        if self.cache.tree_attention is None:
            return super().attend(layer, q, k, v)
        self.row_of[layer] = self.rows
        return self.cache.tree_attention(q, k, v, self.cache.keys[layer], self.cache.values[layer], self.slots,
                                         self.ctx, self.sees)

    def commit(self, path: torch.Tensor) -> None:
        """path (W, levels): the accepted nodes by depth; their K/V go to ctx, ctx + 1, ... in every layer."""
        at = torch.arange(path.shape[1], device=path.device)
        slots = self.slots[:, None]
        for layer, rows in self.row_of.items():
            source, target = self.ctx[:, None] + rows.gather(1, path), self.ctx[:, None] + at
            for store in (self.cache.keys[layer], self.cache.values[layer]):
                store[slots, :, target] = store[slots, :, source]


# ---- the engine's speculative decoder ------------------------------------------------------------------------------

class SpecStreamDecoder:
    """Tree steps for the engine's speculating sequences. Each KV slot's root and draft live on the device
    (`roots`, `drafts`), so a step's only inputs from the host are its slots and context lengths (one copy) and its
    only read back is the accepted counts (one sync). On CUDA a step without pruning is captured once per (sequences,
    tree width, length bucket) as a CUDA graph in the runner's pool, for up to `graph_width` sequences."""

    def __init__(self, model: Decoder, runner: ModelRunner, config: SpecStreamConfig) -> None:
        streams = model.cfg.streams
        if streams is None:
            raise ConfigError("generation.specstream needs a model with speculative streams (a checkpoint written "
                              "by `raytrain train job=specstream`)")
        self.depth = config.gamma or streams.gamma
        if self.depth > streams.gamma:
            raise ConfigError(f"specstream.gamma={config.gamma}: the model has {streams.gamma} streams")
        if config.prune_threshold > 0 and model.prune_adapter is None:
            raise ConfigError("specstream.prune_threshold > 0 needs the tree-pruning adapter; this model has none "
                              "(task.pruning_rank=0)")
        self.model, self.runner, self.cache, self.config = model, runner, runner.cache, config
        device, n = runner.device, runner.n_slots
        self.trees = {k: build_tree(self.depth, k, device) for k in {config.top_k, 1}}
        self.vocab = model.cfg.vocab_size
        self.roots = torch.zeros(n, dtype=torch.long, device=device)  # per KV slot: the newest token, KV unwritten
        self.drafts = torch.zeros(n, streams.gamma, config.top_k, dtype=torch.long, device=device)  # per KV slot
        self.inputs = torch.zeros(2, n, dtype=torch.long, device=device)  # a step's slots and context lengths
        self.emitted = torch.zeros(n, self.depth + 1, dtype=torch.long, device=device)  # a step's new tokens
        self.counts = torch.zeros(n, dtype=torch.long, device=device)  # how many of them (δ + 1)
        self.graphs: dict[tuple[int, int, int], torch.cuda.CUDAGraph] = {}
        self.forwards = 0  # tree steps run
        self.tokens = 0  # tokens emitted by tree steps
        self.accepted: Counter[int] = Counter()  # sequences' tree steps by the number of draft tokens accepted
        self.widths: Counter[int] = Counter()  # tree steps by tree width k (below top_k: narrowed under load)

    @staticmethod
    def margin(config: SpecStreamConfig | None, model: Decoder) -> int:
        """KV positions a slot needs past the context window: the largest tree's rows sit after the committed
        tokens before the accepted ones move into place."""
        if config is None or model.cfg.streams is None:
            return 0
        return tree_size(config.gamma or model.cfg.streams.gamma, config.top_k)

    @staticmethod
    def accepts(params: SamplingParams) -> bool:
        """Speculation is exact for greedy decoding; sampled or penalised requests decode plainly."""
        return params.greedy and params.repetition_penalty == 1.0

    def rows_per_tree(self, k: int) -> int:
        return (1 + self.model.stream_embed.shape[0]) * self.trees[k].size

    def start(self, slot: int, root: int) -> None:
        """A sequence whose prompt but the last token is prefilled: that token is the root of its first tree, under
        a draft of token 0 everywhere (the step emits the first generated token and the first real draft; a draft
        token that happens to be right is accepted like any other)."""
        self.roots[slot] = root
        self.drafts[slot] = 0

    # ---- a tree step ---------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, seqs: list[Any]) -> list[tuple[Any, torch.Tensor]]:
        """One tree step for every sequence (engine `Sequence`s that speculate) -> each one's new tokens (a device
        tensor of δ + 1 tokens, cut to what its budget allows)."""
        width = len(seqs)
        k = self.config.top_k if width * self.rows_per_tree(self.config.top_k) <= self.config.max_step_rows else 1
        self.widths[k] += 1
        context = [s.position for s in seqs]  # each root's position = its committed tokens
        length = bucket(max(context) + self.trees[k].size, self.runner.lengths)
        host = torch.tensor([[s.slot for s in seqs], context], pin_memory=self.runner.device.type == "cuda")
        self.inputs[:, :width].copy_(host, non_blocking=True)
        key = (width, k, length)
        if self.config.prune_threshold > 0 or not self.runner.cuda_graphs or width > self.config.graph_width:
            self._tree_step(*key)
        else:
            if key not in self.graphs:
                self._capture(key)
            self.graphs[key].replay()
        self.forwards += 1
        counts = self.counts[:width].tolist()  # the step's one host sync
        out = []
        for w, (seq, count) in enumerate(zip(seqs, counts)):
            self.accepted[count - 1] += 1
            take = min(count, seq.params.max_new_tokens - seq.sampled)
            seq.sampled += take
            self.tokens += take
            out.append((seq, self.emitted[w, :take]))
        return out

    def _tree_step(self, width: int, k: int, length: int) -> None:
        """A step over the sequences in `inputs[:, :width]` (as captured): verify each slot's tree, commit the
        accepted path's KV, write the new tokens (`emitted`, `counts`) and each slot's next root and draft."""
        tree = self.trees[k]
        slots, ctx = self.inputs[:, :width]
        tokens = tree_tokens(tree, self.roots[slots], self.drafts[slots][:, :self.depth, :k])  # (W, n)
        kv = TreeKV(self.cache, slots, ctx, length)
        every = torch.arange(tree.size, device=tokens.device).expand(width, -1)
        kv.use_rows(tree.ancestors[None], every)
        pruned: dict[str, torch.Tensor] = {}
        prune = self._pruner(tree, tokens, kv, pruned) if self.config.prune_threshold > 0 else None
        states = self.model.forward_streams(tokens, kv, ctx[:, None] + tree.depth, prune=prune)
        rows = pruned.get("rows", every)  # (W, m): the node of each row that went through the MSA layers
        greedy_rows = self.model.logits(states.main)[..., :self.vocab].argmax(-1)  # (W, m)
        greedy = torch.zeros_like(tokens).scatter_(1, rows, greedy_rows)
        path, accepted = accept(tree, tokens, greedy, pruned.get("alive"))
        if not tree.is_chain:  # (pruning keeps a chain's prefix, so its rows stay in place too)
            kv.commit(path)
        last = path.gather(1, accepted[:, None])  # (W, 1) the last accepted node
        new_root = greedy.gather(1, last)[:, 0]
        last_row = pruned["row_of"].gather(1, last) if "row_of" in pruned else last
        streams = states.streams.gather(1, last_row[..., None, None].expand(-1, -1, *states.streams.shape[2:]))
        emitted = torch.cat([tokens.gather(1, path[:, 1:]), new_root[:, None]], dim=1)
        emitted.scatter_(1, accepted[:, None], new_root[:, None])  # δ accepted tokens, then the new root
        self.emitted[:width] = emitted
        self.counts[:width] = accepted + 1
        self.drafts[slots] = self._draft(streams[:, 0])
        self.roots[slots] = new_root

    def _capture(self, key: tuple[int, int, int]) -> None:
        """Capture a step's graph; the capture's warm-up run must leave the slots' roots and drafts as they were
        (the KV it writes is rewritten identically by the replay)."""
        saved = self.roots.clone(), self.drafts.clone()
        self.graphs[key] = self.runner.capture(lambda: self._tree_step(*key))
        self.roots.copy_(saved[0])
        self.drafts.copy_(saved[1])

    def _draft(self, streams: torch.Tensor) -> torch.Tensor:
        """streams (W, γ, d) hidden states -> (W, γ, K) the K most likely tokens of each stream."""
        return self.model.logits(streams)[..., :self.vocab].topk(self.config.top_k, dim=-1).indices

    def _pruner(self, tree: Tree, tokens: torch.Tensor, kv: TreeKV, out: dict[str, torch.Tensor]) -> Any:
        """The `prune` hook of `forward_streams`: decide which nodes survive from the early exit at the internal
        nodes, compact them (padding rows repeat pruned nodes and are never accepted), tell the cache."""
        internal = tree.size - int((tree.depth == tree.depth[-1]).sum())

        def prune(early_exit: torch.Tensor) -> torch.Tensor:
            probs = self.model.logits(early_exit[:, :internal])[..., :self.vocab].float().softmax(-1)
            alive = surviving(tree, tokens, probs, self.config.prune_threshold)  # (W, n)
            width = int(alive.sum(-1).max())  # a host sync, only with pruning on
            rows = torch.sort((~alive).int(), dim=1, stable=True).indices[:, :width]  # survivors first, in order
            row_of = torch.zeros_like(tokens).scatter_(1, rows, torch.arange(width, device=rows.device).expand_as(rows))
            kept = alive.gather(1, rows)
            sees = tree.ancestors[rows[:, :, None], rows[:, None, :]] & kept[:, None, :]
            sees |= torch.eye(width, dtype=torch.bool, device=rows.device)
            kv.use_rows(sees, row_of)
            out.update(rows=rows, alive=alive, row_of=row_of)
            return rows

        return prune
