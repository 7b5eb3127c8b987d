"""Serving many adapters on one base: slots filled on first use, least recently used evicted, a batch mixing
adapters gives each row what that adapter alone gives, and adapters of another base or shape are refused."""

from __future__ import annotations

import pytest
import torch

from raytrain.checkpoint.adapter import AdapterError, base_fingerprint, save_adapter
from raytrain.checkpoint.hf import load_pretrained, model_state, save_pretrained
from raytrain.data.tokenizer import to_files
from raytrain.infer.adapters import AdapterSlots, TooManyAdapters
from raytrain.models.decoder import build_decoder
from raytrain.models.lora import LoRAConfig, adapter_state, apply_lora, lora_layers
from tests.conftest import preset


@pytest.fixture
def served(tokenizer, tmp_path):
    """A base, adapters a (rank 2), b (rank 4), c (rank 4) of it, and x of another base."""
    cfg = preset("afm_micro")
    bases = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        bases.append(save_pretrained(tmp_path / f"base{seed}", cfg, model_state(build_decoder(cfg)),
                                     to_files(tokenizer)))
    for name, rank, base in (("a", 2, bases[0]), ("b", 4, bases[0]), ("c", 4, bases[0]), ("x", 4, bases[1])):
        model = build_decoder(cfg)
        lora = LoRAConfig(rank=rank, alpha=2.0 * rank)
        apply_lora(model, lora)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora_B.normal_(std=0.05)
        save_adapter(tmp_path / name, adapter_state(model), lora, base, base_fingerprint(base))
    return bases[0], tmp_path


def slots_on(base, root, slots: int = 2) -> AdapterSlots:
    model = load_pretrained(base).model
    return AdapterSlots(model, base, base_fingerprint(base), slots, LoRAConfig(rank=4), lambda name: root / name)


def test_a_mixed_batch_gives_each_row_its_adapter_and_slots_are_reused_lru(served) -> None:
    base, root = served
    server = slots_on(base, root)
    tokens = torch.randint(0, 512, (4, 8))
    ids = server.ids(["a", None, "b", "a"])
    assert ids.tolist() == [0, -1, 1, 0] and server.loads == 2
    with server.selection.rows(ids):
        mixed = server.model(tokens)
    alone = {name: load_pretrained(base, adapter=root / name).model for name in ("a", "b")}
    expected = torch.stack([alone["a"](tokens[:1])[0], load_pretrained(base).model(tokens[1:2])[0],
                            alone["b"](tokens[2:3])[0], alone["a"](tokens[3:4])[0]])
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-5)

    assert server.ids(["c"]).tolist() == [0] and server.loads == 3  # "a" was least recently used
    assert server.ids(["b"]).tolist() == [1] and server.loads == 3  # still loaded
    assert server.ids(["a"]).tolist() == [0] and server.loads == 4  # back, in the slot of "c" (now the LRU)
    with server.selection.rows(server.ids(["a"])):
        torch.testing.assert_close(server.model(tokens[:1]), alone["a"](tokens[:1]), rtol=1e-5, atol=1e-5)
    with pytest.raises(TooManyAdapters, match="asks for 3 adapters; this replica holds 2"):
        server.ids(["a", "b", "c"])


def test_adapters_of_another_base_or_a_higher_rank_are_refused(served) -> None:
    base, root = served
    with pytest.raises(AdapterError, match="was trained on base .*base1"):
        slots_on(base, root).ids(["x"])
    narrow = load_pretrained(base).model
    server = AdapterSlots(narrow, base, base_fingerprint(base), 2, LoRAConfig(rank=2), lambda name: root / name)
    with pytest.raises(AdapterError, match="adapter b .* does not fit this replica's slots"):
        server.ids(["b"])
