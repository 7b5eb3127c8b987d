"""The Triton decode attention against the slot cache's PyTorch ops, and a model runner with it against one without;
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
from raytrain.models.kv_cache import attention
from tests.conftest import triton_device

DEVICE = triton_device("the decode attention kernel needs triton")

from raytrain.infer.attention_kernel import decode_attention, tree_attention  # noqa: E402 (under the interpreter)



def reference(q, k, v, keys, values, positions, write_index):
    """The slot cache's eager decode: write k, v at write_index, attend to keys 0..position."""
    rows = torch.arange(q.shape[0])
    keys[rows, :, write_index] = k[:, :, 0]
    values[rows, :, write_index] = v[:, :, 0]
    length = int(positions.max()) + 1
    mask = (torch.arange(length)[None, :] <= positions[:, None])[:, None, None]
    return reference_attention(q, keys[:q.shape[0], :, :length], values[:q.shape[0], :, :length], mask)


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


def test_a_model_runner_with_the_kernel_decodes_the_same_logits(lm: torch.nn.Module) -> None:
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
    requests = [Request(p, SamplingParams(max_new_tokens=12, temperature=0)) for p in PROMPTS]
    engine = Engine(model, tokenizer, EngineConfig(specstream=SpecStreamConfig(top_k=2)))
    engine.runner.cache.tree_attention = tree_attention
    assert [c.token_ids for c in engine.generate(requests)] == [
        c.token_ids for c in Engine(model, tokenizer).generate(requests)]
