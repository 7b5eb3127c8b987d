"""The Triton decode attention against the slot cache's PyTorch ops, and a model runner with it against one without.
Without a GPU it runs under Triton's interpreter (tests/conftest.py switches it on before triton is imported)."""

from __future__ import annotations

import pytest
import torch

from raytrain.infer.kv_cache import decode_attention as reference_attention
from raytrain.infer.model_runner import ModelRunner
from tests.conftest import triton_device

DEVICE = triton_device("the decode attention kernel needs triton")

from raytrain.infer.attention_kernel import decode_attention  # noqa: E402 (decorated now, under the interpreter)



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
