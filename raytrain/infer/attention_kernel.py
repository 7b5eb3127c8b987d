"""Decode attention over the slot KV cache as one Triton kernel (two for long contexts, split-KV below): the new
token's key and value written into the cache, then its query heads attending to their slot, per (row, KV head)
program. And the same for the rows of a Speculative Streaming draft tree (`tree_attention`): one program per
(sequence, KV head, tree row).

Why: a batch-1 decode step of a 1.1B model on an H200 spends ~1.27 ms in ~380 kernels, and the attention of one
layer was five of them (two cache writes, scores, masked softmax, weighted sum: ~13 us a layer, 280 us a step). Here
it is one launch, and it reads exactly the keys a row has (its position, read on the device, bounds the loop), not
the length bucket. The grouped query heads of a KV head (GQA) are the rows of one `tl.dot` tile, padded to 16. The
new key is scored from registers, never read back from the cache it was just stored to, so the kernel needs no
barrier between its store and its loads. Scores and softmax are in fp32 (online softmax over blocks of keys); fp32
inputs use IEEE dots, so float32 runs match the reference ops. For the fused batch-1 step (`fused_decode.py`) the
decode kernel also takes q and k unrotated and applies the per-head QK norm and RoPE itself (`_load_heads`), and is
a programmatic dependent launch there (`dependent_launch`): it loads its first block of cached keys before waiting
for the kernel that computed q, k and v. Each block of keys is loaded one iteration ahead of its use. Under
TRITON_INTERPRET=1 it runs on CPU tensors (slowly), which is how the CPU tests check it.

Split-KV ("flash-decoding") for long contexts: one program streams its row's keys serially, so a model with few KV
heads leaves the GPU idle at batch 1 (SmolLM2-135M, 3 KV heads, at 5,600 keys: 3 programs a layer, ~3 ms a step on
an H200 where its ~130 MB of keys and values take ~30 us to read). Given a bound on the positions known on the host
(`max_position`: a CUDA graph's length bucket), past SPLIT_KEYS the keys of each row are cut into chunks, one program
per (row, KV head, chunk), each writing an fp32 partial (running max, denominator, unnormalised weighted sum); a
second launch (`_combine_splits_kernel`, per (row, query head)) rescales them to the largest max and sums them.
Split 0 stores, and counts, the new key; a chunk wholly past a row's position leaves an empty partial (max -inf,
weight 0). Without a bound, or up to SPLIT_KEYS, it is the single launch above, the same machine code.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

BLOCK_KEYS = 128  # keys per online-softmax step (decode: 5.5 against 6.0 us for 64, 320 keys, H200 2026-12-04)
# keys per split: one block a program. Swept on an H100 (2026-12-05, `python benchmarks/decode_attention.py --device
# cuda`, one row, 256-32,000 keys), 128 had the best geometric-mean speedup over the single kernel on every shape:
# SmolLM2 8.6x (256: 7.2x), TinyLlama 7.6x (6.5x), Llama-2-7B 2.21x (2.20x); at 5,600 keys SmolLM2's layer took 5.4 us
# against 81 us for one program a KV head. Even at 256 keys two splits beat one (3.7 against 4.8 us).
SPLIT_KEYS = 128
# past this many splits the chunks grow instead: the combine holds a (splits, hd) fp32 tile in registers (64 x 128
# is 64 a thread at 4 warps), and a few KV heads x 64 splits already fill 132 SMs
MAX_SPLITS = 64
TREE_BLOCK_KEYS = 64


@triton.jit
def _attend_block(q, k, v, visible, bias, best, total, acc, scale, IEEE: tl.constexpr, BIAS: tl.constexpr):
    """One block of keys in the online softmax: q (GROUP_PAD, hd), k and v (BLOCK, hd), visible (BLOCK,), with BIAS
    the keys' fp32 logit bias (BLOCK,) -> the running max, denominator and weighted sum (fp32) after it."""
    if IEEE:
        scores = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        scores = tl.dot(q, tl.trans(k))
    scores = scores * scale
    if BIAS:
        scores = scores + bias[None, :]
    scores = tl.where(visible[None, :], scores, float("-inf"))  # (GROUP_PAD, BLOCK)
    new_best = tl.maximum(best, tl.max(scores, axis=1))
    rescale = tl.exp(best - new_best)
    p = tl.exp(scores - new_best[:, None])
    total = total * rescale + tl.sum(p, axis=1)
    if IEEE:
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v)
    return new_best, total, acc


@triton.jit
def _load_heads(ptr, heads, live, stride_head, position, cos_ptr, sin_ptr, gain_ptr, eps,
                ROPE: tl.constexpr, QK_NORM: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Rows `heads` (H,) of a (heads, hd) tile at `ptr`; with ROPE, rotated to `position` (rotate-half: dim d pairs
    with d ± hd/2), after a per-head RMSNorm with QK_NORM. Each rounding as `ops.rms_norm` and `ops.rope` round."""
    d = tl.arange(0, HEAD_DIM)
    x = tl.load(ptr + heads[:, None] * stride_head + d[None, :], mask=live[:, None], other=0.0)
    if ROPE:
        dtype = x.dtype
        partner = (d + HEAD_DIM // 2) % HEAD_DIM
        xp = tl.load(ptr + heads[:, None] * stride_head + partner[None, :], mask=live[:, None], other=0.0)
        if QK_NORM:
            x32 = x.to(tl.float32)
            scale = tl.rsqrt(tl.sum(x32 * x32, axis=1) / HEAD_DIM + eps)[:, None]
            x = (tl.load(gain_ptr + d).to(tl.float32)[None, :] * (x32 * scale).to(dtype).to(tl.float32)).to(dtype)
            xp = (tl.load(gain_ptr + partner).to(tl.float32)[None, :]
                  * (xp.to(tl.float32) * scale).to(dtype).to(tl.float32)).to(dtype)
        cos = tl.load(cos_ptr + position * HEAD_DIM + d)[None, :]
        sin = tl.load(sin_ptr + position * HEAD_DIM + d)[None, :]
        sign = tl.where(d < HEAD_DIM // 2, -1.0, 1.0)[None, :]
        x = (x.to(tl.float32) * cos + sign * xp.to(tl.float32) * sin).to(dtype)
    return x


@triton.jit
def _cached_block(keys, values, index, position, sK_index, sV_index, d):
    """Keys and values (BLOCK, hd) at `index` of a slot's cache, zeros at and past `position`."""
    valid = (index < position)[:, None]
    k = tl.load(keys + index[:, None] * sK_index + d[None, :], mask=valid, other=0.0)
    v = tl.load(values + index[:, None] * sV_index + d[None, :], mask=valid, other=0.0)
    return k, v


@triton.jit
def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, keys_ptr, values_ptr, pos_ptr, write_ptr, out_ptr,
                             part_ptr, best_ptr, total_ptr, chunk, bias_ptr, sB_slot,
                             cos_ptr, sin_ptr, q_gain_ptr, k_gain_ptr, eps,
                             sq_row, sq_head, sk_row, sk_head, sv_row, sv_head,
                             sK_slot, sK_head, sK_index, sV_slot, sV_head, sV_index, so_row, so_head, scale,
                             GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                             BLOCK: tl.constexpr, IEEE: tl.constexpr, ROPE: tl.constexpr, QK_NORM: tl.constexpr,
                             ROPE_ROWS: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr,
                             BIAS: tl.constexpr):
    row, kv_head = tl.program_id(0), tl.program_id(1)
    # positions and the cached keys 0..position-1 were written before the step's first kernel started, so they are
    # read before waiting for the previous kernel; each block of keys is loaded one iteration ahead
    position, write_index = tl.load(pos_ptr + row), tl.load(write_ptr + row)
    if SPLIT:  # keys [split * chunk, +chunk) below the position; the last split also takes any past max_position
        split, splits = tl.program_id(2), tl.num_programs(2)
        start = split * chunk
        end = tl.where(split == splits - 1, position, tl.minimum(start + chunk, position))
        owner = split == 0  # the split that stores the new key and value, and counts them, once
    else:
        start, end, owner = 0, position, True
    g, d = tl.arange(0, GROUP_PAD), tl.arange(0, HEAD_DIM)
    keys = keys_ptr + row * sK_slot + kv_head * sK_head
    values = values_ptr + row * sV_slot + kv_head * sV_head
    k, v = _cached_block(keys, values, start + tl.arange(0, BLOCK), end, sK_index, sV_index, d)
    if PDL:  # the next kernel may start reading its weights; q, k and v are the previous kernel's outputs
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    heads = kv_head * GROUP + g
    one = tl.arange(0, 1)  # the new key and value as (1, hd) tiles
    angle = row if ROPE_ROWS else position  # the row of the cos and sin tables
    q = _load_heads(q_ptr + row * sq_row, heads, g < GROUP, sq_head, angle, cos_ptr, sin_ptr, q_gain_ptr, eps,
                    ROPE, QK_NORM, HEAD_DIM)
    k_new = _load_heads(k_ptr + row * sk_row, kv_head + one, one == 0, sk_head, angle, cos_ptr, sin_ptr,
                        k_gain_ptr, eps, ROPE, QK_NORM, HEAD_DIM)
    v_new = tl.load(v_ptr + row * sv_row + kv_head * sv_head + d)[None, :]
    if owner:  # write_index is the row's position (or past the slot for an idle row): never among the keys read
        tl.store(keys + write_index * sK_index + d[None, :], k_new)
        tl.store(values + write_index * sV_index + d[None, :], v_new)
    # the new key first: the running max, denominator and weighted sum start from it (the other splits start empty)
    best = tl.where(owner, tl.sum(q.to(tl.float32) * k_new.to(tl.float32), axis=1) * scale, float("-inf"))
    total = tl.where(owner, tl.full([GROUP_PAD], 1.0, tl.float32), 0.0)
    acc = tl.where(owner, tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32) + v_new.to(tl.float32), 0.0)
    # every block holds a visible key (it starts below end), so the running max turns finite in the first one
    for block_start in range(start, end, BLOCK):  # the cached keys start..end-1
        index = block_start + tl.arange(0, BLOCK)
        if BIAS:  # the new key's bias is 0: generated tokens belong to no path
            bias = tl.load(bias_ptr + row * sB_slot + index, mask=index < end, other=0.0)
        else:
            bias = best
        best, total, acc = _attend_block(q, k, v, index < end, bias, best, total, acc, scale, IEEE, BIAS)
        k, v = _cached_block(keys, values, index + BLOCK, end, sK_index, sV_index, d)
    live = g < GROUP
    if SPLIT:  # the partial, unnormalised: (W, n_q, splits, hd) and (W, n_q, splits)
        part = (row * tl.num_programs(1) * GROUP + heads) * splits + split
        tl.store(best_ptr + part, best, mask=live)
        tl.store(total_ptr + part, total, mask=live)
        tl.store(part_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=live[:, None])
    else:
        out = acc / total[:, None]
        tl.store(out_ptr + row * so_row + heads[:, None] * so_head + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=live[:, None])


@triton.jit
def _combine_splits_kernel(part_ptr, best_ptr, total_ptr, out_ptr, splits, so_row, so_head,
                           HEAD_DIM: tl.constexpr, SPLITS_PAD: tl.constexpr, PDL: tl.constexpr):
    row, head = tl.program_id(0), tl.program_id(1)
    if PDL:  # the next kernel may start reading its weights; the partials are the previous kernel's outputs
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    s, d = tl.arange(0, SPLITS_PAD), tl.arange(0, HEAD_DIM)
    part = (row * tl.num_programs(1) + head) * splits + s
    best = tl.load(best_ptr + part, mask=s < splits, other=float("-inf"))
    total = tl.load(total_ptr + part, mask=s < splits, other=0.0)
    acc = tl.load(part_ptr + part[:, None] * HEAD_DIM + d[None, :], mask=(s < splits)[:, None], other=0.0)
    # split 0 always holds the new key, so the max is finite and an empty split's (-inf) weighs exp(-inf) = 0
    weight = tl.exp(best - tl.max(best, axis=0))
    out = tl.sum(acc * weight[:, None], axis=0) / tl.sum(total * weight, axis=0)
    tl.store(out_ptr + row * so_row + head * so_head + d, out.to(out_ptr.dtype.element_ty))


def _key_splits(max_position: int | None) -> tuple[int, int]:
    """(splits, keys per split) for rows with at most `max_position` cached keys: chunks of SPLIT_KEYS, or of a
    multiple of BLOCK_KEYS past MAX_SPLITS of them; one split (the plain kernel) up to SPLIT_KEYS."""
    if max_position is None or max_position <= SPLIT_KEYS:
        return 1, 0
    chunk = SPLIT_KEYS
    if max_position > MAX_SPLITS * chunk:
        chunk = BLOCK_KEYS * triton.cdiv(max_position, MAX_SPLITS * BLOCK_KEYS)
    return triton.cdiv(max_position, chunk), chunk


@torch.compiler.disable  # opaque to torch.compile (it mutates the cache); replayed inside the step's CUDA graph
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     positions: torch.Tensor, write_index: torch.Tensor,
                     rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                     qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None, rope_rows: bool = False,
                     max_position: int | None = None, dependent_launch: bool = False,
                     key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """q (W, n_q, 1, hd), the new k and v (W, n_kv, 1, hd), one layer's cache keys/values (n_slots, n_kv, S, hd)
    (row w is slot w), positions and write_index (W,) -> (W, n_q, 1, hd). Stores k, v at `write_index`, then each row
    attends to its keys 0..position-1 and the new one. With `rope` (the fp32 cos and sin tables, (positions, hd)),
    q and k arrive unrotated and are rotated to each row's position here, after the per-head RMSNorm of `qk_norm`
    (the q and k gains and eps) when given: the fused decode step's attention (`raytrain/infer/fused_decode.py`).
    `rope_rows`: the tables hold one row of angles per row of q, (W, hd), not one per position: rows at real-valued
    positions (a superposed prompt's), whose angles the step computes once for all layers.
    `max_position`: a bound, known on the host, on every row's position (a CUDA graph's length bucket); past
    SPLIT_KEYS it splits each row's keys into chunks attended by separate programs, then combined by a second kernel
    (split-KV, module docstring). A row past the bound is still attended exactly, its last split reading the rest of
    its keys, only slower. None, or a bound of at most SPLIT_KEYS: one program per (row, KV head), one launch.
    `dependent_launch`: launched as a programmatic dependent of the previous kernel (`gemv`'s, CUDA sm90+); split,
    the combine is one of the split kernel (it waits for it before reading anything, and lets the next start).
    `key_bias` (n_slots, S) fp32: added to each row's attention logits of its cached keys (superposition's
    attenuation); None: no bias, and no load of one."""
    W, n_q, _, hd = q.shape
    n_kv = k.shape[1]
    if any(t.stride(-1) != 1 for t in (q, k, v, keys, values)):
        raise ValueError("decode_attention needs the head dimension contiguous in q, k, v and the cache")
    if (qk_norm is not None or rope_rows) and rope is None:
        raise ValueError("decode_attention normalises q and k (qk_norm), and reads rope_rows, only with rope tables")
    if rope_rows and any(t.shape != (W, hd) or not t.is_contiguous() for t in rope):
        raise ValueError(f"rope_rows: the cos and sin tables hold one contiguous row per row of q, ({W}, {hd}); "
                         f"got {tuple(rope[0].shape)}")
    group = n_q // n_kv
    out = q.new_empty(W, n_q, 1, hd)
    cos, sin = rope if rope is not None else (q, q)
    q_gain, k_gain, eps = qk_norm if qk_norm is not None else (q, q, 0.0)
    splits, chunk = _key_splits(max_position)
    if splits > 1:  # fp32 partials: each split's running max, denominator and unnormalised weighted sum
        part = torch.empty(W, n_q, splits, hd, dtype=torch.float32, device=q.device)
        best, total = torch.empty(2, W, n_q, splits, dtype=torch.float32, device=q.device)
    else:  # placeholders for the pointers the one-split kernel never touches
        part, best, total = out, out, out
    _decode_attention_kernel[(W, n_kv, splits)](
        q, k, v, keys, values, positions, write_index, out, part, best, total, chunk,
        key_bias if key_bias is not None else out, key_bias.stride(0) if key_bias is not None else 0,
        cos, sin, q_gain, k_gain, eps,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0), values.stride(1), values.stride(2),
        out.stride(0), out.stride(1), 1 / math.sqrt(hd),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=hd, BLOCK=BLOCK_KEYS,
        IEEE=q.dtype == torch.float32, ROPE=rope is not None, QK_NORM=qk_norm is not None,
        ROPE_ROWS=rope_rows, SPLIT=splits > 1, PDL=dependent_launch, BIAS=key_bias is not None,
        num_warps=4, launch_pdl=dependent_launch)
    if splits > 1:
        _combine_splits_kernel[(W, n_q)](
            part, best, total, out, splits, out.stride(0), out.stride(1),
            HEAD_DIM=hd, SPLITS_PAD=triton.next_power_of_2(splits), PDL=dependent_launch,
            num_warps=4, launch_pdl=dependent_launch)
    return out


@triton.jit
def _tree_attention_kernel(q_ptr, k_ptr, v_ptr, keys_ptr, values_ptr, slots_ptr, ctx_ptr, sees_ptr, out_ptr,
                           sq_seq, sq_head, sq_row, sk_seq, sk_head, sk_row, sv_seq, sv_head, sv_row,
                           sK_slot, sK_head, sK_index, sV_slot, sV_head, sV_index, ss_seq, ss_row,
                           so_seq, so_head, so_row, rows, scale,
                           GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                           BLOCK: tl.constexpr, IEEE: tl.constexpr):
    seq, kv_head, row = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    slot, ctx = tl.load(slots_ptr + seq), tl.load(ctx_ptr + seq)
    g, d = tl.arange(0, GROUP_PAD), tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + g
    q = tl.load(q_ptr + seq * sq_seq + heads[:, None] * sq_head + row * sq_row + d[None, :],
                mask=(g < GROUP)[:, None], other=0.0)
    tree_k = k_ptr + seq * sk_seq + kv_head * sk_head
    tree_v = v_ptr + seq * sv_seq + kv_head * sv_head
    keys = keys_ptr + slot * sK_slot + kv_head * sK_head
    values = values_ptr + slot * sV_slot + kv_head * sV_head
    tl.store(keys + (ctx + row) * sK_index + d, tl.load(tree_k + row * sk_row + d))
    tl.store(values + (ctx + row) * sV_index + d, tl.load(tree_v + row * sv_row + d))
    best = tl.full([GROUP_PAD], -1.0e30, tl.float32)  # finite: the first block may hold no visible key
    total = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for start in range(0, ctx + rows, BLOCK):  # committed keys from the cache, then the tree's from the inputs
        index = start + tl.arange(0, BLOCK)
        committed = index < ctx
        node = index - ctx
        in_tree = (node >= 0) & (node < rows)
        sees = tl.load(sees_ptr + seq * ss_seq + row * ss_row + node, mask=in_tree, other=0) != 0
        k = tl.load(keys + index[:, None] * sK_index + d[None, :], mask=committed[:, None], other=0.0)
        k += tl.load(tree_k + node[:, None] * sk_row + d[None, :], mask=(in_tree & sees)[:, None], other=0.0)
        v = tl.load(values + index[:, None] * sV_index + d[None, :], mask=committed[:, None], other=0.0)
        v += tl.load(tree_v + node[:, None] * sv_row + d[None, :], mask=(in_tree & sees)[:, None], other=0.0)
        # no key bias: superposed requests, the only ones whose slots hold one, never speculate
        best, total, acc = _attend_block(q, k, v, committed | (in_tree & sees), best, best, total, acc, scale, IEEE,
                                         False)
    out = acc / total[:, None]
    tl.store(out_ptr + seq * so_seq + heads[:, None] * so_head + row * so_row + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=(g < GROUP)[:, None])


@torch.compiler.disable
def tree_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                   slots: torch.Tensor, ctx: torch.Tensor, sees: torch.Tensor) -> torch.Tensor:
    """q (W, n_q, m, hd), the tree rows' k and v (W, n_kv, m, hd), one layer's cache keys/values (slots, n_kv, S, hd),
    each sequence's slot and committed length `ctx` (W,), sees (W or 1, m, m) int8 (row i attends to tree row j)
    -> (W, n_q, m, hd). Stores row i's k, v at index ctx + i of its slot; row i attends to the slot's keys
    0..ctx-1 and to the tree rows it sees, the latter read from k and v (not back from the cache)."""
    W, n_q, m, hd = q.shape
    n_kv = k.shape[1]
    if any(t.stride(-1) != 1 for t in (q, k, v, keys, values)):
        raise ValueError("tree_attention needs the head dimension contiguous in q, k, v and the cache")
    group = n_q // n_kv
    out = q.new_empty(W, m, n_q, hd).transpose(1, 2)  # rows outermost: the caller's transpose + reshape is a view
    _tree_attention_kernel[(W, n_kv, m)](
        q, k, v, keys, values, slots, ctx, sees, out,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0), values.stride(1), values.stride(2),
        sees.stride(0) if sees.shape[0] > 1 else 0, sees.stride(1), out.stride(0), out.stride(1), out.stride(2),
        m, 1 / math.sqrt(hd),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=hd, BLOCK=TREE_BLOCK_KEYS,
        IEEE=q.dtype == torch.float32, num_warps=4)
    return out
