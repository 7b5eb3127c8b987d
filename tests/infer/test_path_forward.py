"""Batched path forwards padded to shape buckets (what the GPU replays as CUDA graphs) against the same forwards at
their own shapes: equal segments, hidden states and attention mass, also after a larger forward left its values in
the shared buffers, and an equal superposed prefill."""

from __future__ import annotations

import torch

from raytrain.infer.path_forward import KVLayout, PathForward, Segment
from raytrain.infer.superposition import Superposer, SuperpositionConfig
from tests.infer.test_superposition import random_prompt

ATOL = 1e-5


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(4, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def query_forward(forward: PathForward, lengths: list[int], seed: int) -> tuple[list[Segment], torch.Tensor, torch.Tensor]:
    """A preamble, documents of `lengths` over it, then a query copy over each document (the saliency forward)."""
    preamble = forward([ids(5, seed)], [torch.arange(5, dtype=torch.float64)])[0][0]
    documents = [ids(n, seed + i + 1) for i, n in enumerate(lengths)]
    paths = forward(documents, [5 + 0.5 * torch.arange(n, dtype=torch.float64) for n in lengths], shared=preamble)[0]
    query = ids(4, seed + 99)
    positions = 9.5 + torch.arange(4, dtype=torch.float64)
    segments, hidden, mass = forward([query] * len(lengths), [positions] * len(lengths), shared=preamble, rows=paths,
                                     track=True)
    return segments, hidden.clone(), mass.clone()


def assert_same(a: tuple[list[Segment], torch.Tensor, torch.Tensor],
                b: tuple[list[Segment], torch.Tensor, torch.Tensor]) -> None:
    assert [s.tokens for s in a[0]] == [s.tokens for s in b[0]]
    for x, y in zip(a[0], b[0]):
        assert x.kv.shape == y.kv.shape and torch.allclose(x.kv, y.kv, atol=ATOL)
    assert a[1].shape == b[1].shape and torch.allclose(a[1], b[1], atol=ATOL)
    assert torch.allclose(a[2], b[2], atol=ATOL) and (a[2] > 0).all()


def test_padded_forwards_equal_the_eager_ones_and_ignore_what_larger_ones_left(lm) -> None:
    layout = KVLayout(lm)
    eager, padded = PathForward(lm, layout), PathForward(lm, layout, graph_tokens=4096)
    with torch.inference_mode():
        assert_same(query_forward(padded, [7, 3, 5], seed=1), query_forward(eager, [7, 3, 5], seed=1))
        size = padded.buffers["kv"].numel()
        assert size == 3 * (16 + 16 + 16) * layout.width  # 3 rows of 5 shared, 7 own and 4 new tokens, each to 16
        # fewer, shorter rows: the earlier forward's keys sit in this one's padded columns, which must stay masked
        assert_same(query_forward(padded, [2, 1], seed=2), query_forward(eager, [2, 1], seed=2))
        assert padded.buffers["kv"].numel() == size


def test_a_superposed_prefill_through_padded_forwards_equals_the_eager_one(lm) -> None:
    prompt = random_prompt([6, 9, 4, 7], seed=3)
    eager = Superposer(lm, SuperpositionConfig(top_k=2))
    padded = Superposer(lm, SuperpositionConfig(top_k=2))
    padded.forward = PathForward(lm, padded.layout, graph_tokens=4096)  # what a GPU engine runs, without graphs
    want, got = eager.prefill(prompt), padded.prefill(prompt)
    assert got.selection.kept == want.selection.kept and got.tokens == want.tokens
    assert torch.allclose(torch.tensor(got.selection.scores), torch.tensor(want.selection.scores), atol=ATOL)
    assert torch.allclose(got.logits, want.logits, atol=ATOL)
    assert all(torch.allclose(a, b, atol=ATOL) for a, b in zip(got.keys + got.values, want.keys + want.values))
