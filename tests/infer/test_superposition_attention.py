"""benchmarks/superposition_attention.py's probe: the last token's attention, read inside the masked forward, is a
distribution over exactly the columns its mask lets it see (so the shares it reports are parts of a whole)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from raytrain.infer.forkjoin import ForkJoinPrompt, oracle_layout, prompt_cache_layout
from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("attention_bench", REPO / "benchmarks" / "superposition_attention.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def prompt() -> ForkJoinPrompt:
    g = torch.Generator().manual_seed(3)
    ids = [torch.randint(4, 512, (n,), generator=g).tolist() for n in (5, 3, 7, 4, 4, 3)]
    return ForkJoinPrompt(ids[0], ids[1:4], ids[4], ids[5])


@pytest.mark.parametrize("graph", ["prompt_cache", "pruned_superposition"])
def test_the_shares_split_the_visible_columns_and_nothing_else(lm, graph) -> None:
    p = prompt()
    layout = prompt_cache_layout(p) if graph == "prompt_cache" else oracle_layout(p, kept=[1])
    visible = layout.mask[-1].nonzero()[:, 0].tolist()
    hidden = [c for c in range(len(layout.tokens)) if c not in visible]
    groups = {**bench.groups_of(layout, 3), "visible": visible, "hidden": hidden}
    shares = bench.attention_shares(lm, layout, groups)
    assert shares["visible"] == pytest.approx(1.0, abs=1e-5) and shares["hidden"] == 0.0
    assert all(0 < shares[k] < 1 for k in ("document_first_tokens", "preamble", "sequence_first_token"))
    if graph == "pruned_superposition":  # documents 0 and 2 are pruned: only document 1's first token is seen
        one = bench.attention_shares(lm, layout, {"d1": [layout.spans["document", 1].start]})["d1"]
        assert shares["document_first_tokens"] == pytest.approx(one)
