"""The Triton decode attention against the slot cache's PyTorch ops, split over chunks of keys (split-KV, with small
blocks and splits so that a few dozen keys make several) and not, and a model runner with it against one without;
the Triton tree attention against the tree cache's ops, and Speculative Streaming with it against greedy decoding.
Without a GPU it runs under Triton's interpreter (tests/conftest.py switches it on before triton is imported)."""

from __future__ import annotations

import pytest
import torch

from raytrain.infer.engine import Engine, EngineConfig, Request
from raytrain.infer.kv_cache import SlotKVCache
from raytrain.infer.kv_cache import decode_attention as reference_attention
from raytrain.infer.model_runner import ModelRunner
from raytrain.infer.sampling import SamplingParams
from raytrain.infer.specstream import SpecStreamConfig, TreeKV, build_tree
from raytrain.models import ops
from raytrain.models.kv_cache import attention
from tests.conftest import triton_device

DEVICE = triton_device("the decode attention kernel needs triton")

import raytrain.infer.attention_kernel as attention_kernel  # noqa: E402 (under the interpreter)
from raytrain.infer.attention_kernel import decode_attention, tree_attention  # noqa: E402


def reference(q, k, v, keys, values, positions, write_index, key_bias=None):
    """The slot cache's eager decode: write k, v at write_index, attend to keys 0..position (with a per-key logit
    bias when given)."""
    rows = torch.arange(q.shape[0])
    keys[rows, :, write_index] = k[:, :, 0]
    values[rows, :, write_index] = v[:, :, 0]
    length = int(positions.max()) + 1
    mask = (torch.arange(length)[None, :] <= positions[:, None])[:, None, None]
    bias = key_bias[:q.shape[0], None, None, :length] if key_bias is not None else None
    return reference_attention(q, keys[:q.shape[0], :, :length], values[:q.shape[0], :, :length], mask, bias)


@pytest.mark.parametrize("n_q, n_kv", [(8, 2), (2, 2)])  # grouped query heads, and one query head per KV head
def test_the_kernel_writes_the_new_key_and_attends_like_the_cache_ops(n_q: int, n_kv: int) -> None:
    torch.manual_seed(0)
    W, slots, max_len, hd = 3, 4, 80, 16
    q, k, v = (torch.randn(W, n, 1, hd) for n in (n_q, n_kv, n_kv))
    keys, values = torch.randn(slots, n_kv, max_len + 1, hd), torch.randn(slots, n_kv, max_len + 1, hd)
    positions = torch.tensor([70, 5, 0])  # past a 64-key block, within one, and an idle row
    write_index = torch.tensor([70, 5, max_len])  # the idle row writes the scratch index
    want_keys, want_values = keys.clone(), values.clone()
    want = reference(q, k, v, want_keys, want_values, positions, write_index)
    dev = [t.to(DEVICE) for t in (q, k, v, keys, values, positions, write_index)]
    got = decode_attention(*dev)
    torch.testing.assert_close(got.cpu()[:2], want[:2], atol=1e-5, rtol=1e-5)
    assert torch.equal(dev[3].cpu(), want_keys) and torch.equal(dev[4].cpu(), want_values)  # nothing else written


@pytest.fixture
def small_splits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 16 keys and splits of 32, so that a few dozen keys make several splits of several blocks."""
    monkeypatch.setattr(attention_kernel, "BLOCK_KEYS", 16)
    monkeypatch.setattr(attention_kernel, "SPLIT_KEYS", 32)


def test_the_split_count_follows_the_bound(small_splits: None) -> None:
    """One split (the plain kernel) up to SPLIT_KEYS keys or with no bound; chunks of SPLIT_KEYS past it."""
    assert attention_kernel._key_splits(None) == (1, 0) and attention_kernel._key_splits(32) == (1, 0)
    assert attention_kernel._key_splits(33) == (2, 32) and attention_kernel._key_splits(64) == (2, 32)
    bound = 3 * attention_kernel.MAX_SPLITS * 32 + 5  # past MAX_SPLITS chunks: fewer, longer ones, whole blocks
    splits, chunk = attention_kernel._key_splits(bound)
    assert splits <= attention_kernel.MAX_SPLITS and chunk % 16 == 0 and (splits - 1) * chunk < bound <= splits * chunk


def split_case(n_q: int, n_kv: int, positions: list[int], hd: int = 16, slots: int = 4,
               max_len: int = 120) -> tuple[torch.Tensor, ...]:
    """q, k, v, a random cache and the rows' positions, each row writing at its position."""
    torch.manual_seed(0)
    W = len(positions)
    q, k, v = (torch.randn(W, n, 1, hd) for n in (n_q, n_kv, n_kv))
    keys, values = torch.randn(slots, n_kv, max_len, hd), torch.randn(slots, n_kv, max_len, hd)
    positions = torch.tensor(positions)
    return q, k, v, keys, values, positions, positions.clone()


def split_and_single(case, max_position: int, **kwargs) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """decode_attention with several splits and with one (each on its own copy of the cache): outputs and the
    split run's inputs (its cache as it left it); the two caches must be equal."""
    runs = []
    for bound in (max_position, None):
        dev = [t.to(DEVICE) for t in case]
        runs.append((decode_attention(*dev, max_position=bound, **kwargs).cpu(), dev))
    (split, dev), (single, single_dev) = runs
    assert attention_kernel._key_splits(max_position)[0] > 1
    assert torch.equal(dev[3].cpu(), single_dev[3].cpu()) and torch.equal(dev[4].cpu(), single_dev[4].cpu())
    return split, single, dev


@pytest.mark.parametrize("max_position", [64, 100])  # the longest row ends the last split; splits 2, 3 hold no key
@pytest.mark.parametrize("n_q, n_kv", [(8, 2), (2, 2)])
def test_split_keys_attend_like_the_cache_ops_and_the_single_kernel(small_splits: None, n_q: int, n_kv: int,
                                                                    max_position: int) -> None:
    """Rows at 64 (on a split boundary), 45 (mid-split) and 0 (the new key alone) in one call: the combined splits
    equal the eager decode and the one-split kernel, and the cache gains the new key and value once, at write_index."""
    case = split_case(n_q, n_kv, [64, 45, 0])
    want_keys, want_values = case[3].clone(), case[4].clone()
    want = reference(*case[:3], want_keys, want_values, *case[5:])
    got, single, dev = split_and_single(case, max_position)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, single, atol=1e-5, rtol=1e-5)
    assert torch.equal(dev[3].cpu(), want_keys) and torch.equal(dev[4].cpu(), want_values)  # nothing else written


@pytest.mark.parametrize("qk_norm, rope_rows", [(False, False), (True, False), (False, True), (True, True)])
def test_split_keys_rotate_and_normalise_the_new_key_once(small_splits: None, qk_norm: bool, rope_rows: bool) -> None:
    """With RoPE (from position tables, or one row per row of q) and QK norm, three query heads a KV head: every
    split rotates q alike and only one stores and counts the rotated new key; equal to the eager ops."""
    case = split_case(6, 2, [64, 45, 0])
    q, k, v, _, _, positions, write_index = case
    W, hd = q.shape[0], q.shape[-1]
    cos, sin = torch.randn(W if rope_rows else 100, hd), torch.randn(W if rope_rows else 100, hd)
    q_gain, k_gain = torch.rand(hd) + 0.5, torch.rand(hd) + 0.5
    at = torch.arange(W) if rope_rows else positions

    def rotate(x: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
        return ops.rope(ops.rms_norm(x, gain, 1e-5) if qk_norm else x, cos[at][:, None, None], sin[at][:, None, None])

    want_keys, want_values = case[3].clone(), case[4].clone()
    want = reference(rotate(q, q_gain), rotate(k, k_gain), v, want_keys, want_values, positions, write_index)
    got, single, dev = split_and_single(case, 100, rope=(cos.to(DEVICE), sin.to(DEVICE)), rope_rows=rope_rows,
                                        qk_norm=(q_gain.to(DEVICE), k_gain.to(DEVICE), 1e-5) if qk_norm else None)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, single, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dev[3].cpu(), want_keys, atol=1e-6, rtol=1e-6)
    assert torch.equal(dev[4].cpu(), want_values)


def test_a_key_bias_shifts_the_logits_of_each_rows_keys(small_splits: None) -> None:
    """Superposition's attenuation: a per-slot, per-key fp32 bias on the cached keys' logits (0 on the new key),
    split and not, equal to the eager ops with the bias, and different from attending without it."""
    case = split_case(4, 2, [64, 45, 0])
    key_bias = -3 * torch.rand(4, case[3].shape[2])
    key_bias[:, 45:] = 0  # the rows' new keys carry none (generated tokens belong to no path)
    want_keys, want_values = case[3].clone(), case[4].clone()
    want = reference(*case[:3], want_keys, want_values, *case[5:], key_bias=key_bias)
    unbiased = reference(*case[:3], case[3].clone(), case[4].clone(), *case[5:])
    got, single, _ = split_and_single(case, 100, key_bias=key_bias.to(DEVICE))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(single, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[:2], unbiased[:2], atol=1e-3)


def test_a_row_past_max_position_is_still_attended_exactly(small_splits: None) -> None:
    """max_position is a speed bound, not a limit: the last split reads whatever keys lie past it."""
    case = split_case(4, 2, [100, 30])
    want_keys, want_values = case[3].clone(), case[4].clone()
    want = reference(*case[:3], want_keys, want_values, *case[5:])
    got, _, dev = split_and_single(case, 40)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(dev[3].cpu(), want_keys) and torch.equal(dev[4].cpu(), want_values)


@pytest.mark.parametrize("split", [False, True])  # split: the runner's length bucket (96) makes 3 splits of 32 keys
def test_a_model_runner_with_the_kernel_decodes_the_same_logits(lm: torch.nn.Module, split: bool,
                                                                 request: pytest.FixtureRequest) -> None:
    if split:
        request.getfixturevalue("small_splits")
    model = lm.to(DEVICE)
    runners = [ModelRunner(model, n_slots=2, max_len=96, cuda_graphs=False, fused_attention=fused)
               for fused in (False, True)]
    prompts = [list(range(3, 40)), list(range(50, 120))]  # the second one crosses a 64-key block
    logits = []
    for runner in runners:
        steps = []
        for slot, prompt in enumerate(prompts):
            first = runner.prefill(slot, prompt, 0).argmax(-1)
            runner.join(slot, first, len(prompt))
        for _ in range(4):
            out = runner.decode(2, 96).clone()
            steps.append(out)
            runner.advance(2, out.argmax(-1))
        logits.append(torch.stack(steps))
    torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n_q, n_kv", [(8, 2), (2, 2)])
def test_the_tree_kernel_writes_the_rows_and_attends_like_the_tree_cache(n_q: int, n_kv: int) -> None:
    """Two sequences in slots 2 and 0 with 70 and 3 committed keys (across a 64-key block, and within one), the
    γ = 2, k = 3 tree (13 rows): the kernel's output and cache equal TreeKV's writes, gather and masked SDPA."""
    torch.manual_seed(0)
    tree, hd = build_tree(2, 3), 16
    W, m = 2, tree.size
    q, k, v = (torch.randn(W, n, m, hd) for n in (n_q, n_kv, n_kv))
    slots, ctx = torch.tensor([2, 0]), torch.tensor([70, 3])
    caches = [SlotKVCache([n_kv], hd, n_slots=3, max_len=96, dtype=torch.float32, device=torch.device("cpu"))
              for _ in range(2)]
    for cache in caches[1:]:
        cache.keys[0].copy_(caches[0].keys[0].normal_())
        cache.values[0].copy_(caches[0].values[0].normal_())
    kv = TreeKV(caches[0], slots, ctx, length=96)
    kv.use_rows(tree.ancestors[None], torch.arange(m).expand(W, -1))
    want = attention(q, *kv.update(0, q, k, v))
    dev = [t.to(DEVICE) for t in (q, k, v, caches[1].keys[0], caches[1].values[0], slots, ctx, kv.sees)]
    got = tree_attention(*dev)
    torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-5)
    assert torch.equal(dev[3].cpu(), caches[0].keys[0]) and torch.equal(dev[4].cpu(), caches[0].values[0])


def test_speculative_streaming_with_the_tree_kernel_decodes_greedily(tokenizer) -> None:
    from tests.infer.test_specstream import PROMPTS, streams_lm

    model = streams_lm().to(DEVICE)
    # 8 tokens: 6 tree steps, of the three requests batched and of one alone (the interpreted kernel takes ~2 s a
    # step and layer; 12 tokens took 9)
    requests = [Request(p, SamplingParams(max_new_tokens=8, temperature=0)) for p in PROMPTS]
    engine = Engine(model, tokenizer, EngineConfig(specstream=SpecStreamConfig(top_k=2)))
    engine.runner.cache.tree_attention = tree_attention
    assert [c.token_ids for c in engine.generate(requests)] == [
        c.token_ids for c in Engine(model, tokenizer).generate(requests)]
