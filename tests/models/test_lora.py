"""LoRA on the decoder: AFM-3B's adapter parameter counts, a new adapter is the identity, merged = unmerged, split
projections are separate LoRA, and a batch mixing adapters row by row computes each row's adapter alone."""

from __future__ import annotations

import pytest
import torch

from raytrain.models.decoder import build_decoder
from raytrain.models.lora import (LoRAConfig, adapter_state, apply_lora, load_adapter_state, lora_layers,
                                  lora_parameters, merge_lora)
from tests.conftest import preset


@pytest.fixture
def base() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_decoder(preset("afm_micro")).eval()


def randomise(model: torch.nn.Module, seed: int, slot: int = 0) -> None:
    """Non-zero B (a trained adapter), so the adapter changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_A[slot] = torch.randn(layer.lora_A[slot].shape, generator=g) * 0.1
            layer.lora_B[slot] = torch.randn(layer.lora_B[slot].shape, generator=g) * 0.1


def single_scale(model: torch.nn.Module) -> float:
    return float(next(iter(lora_layers(model).values())).scale[0])


@pytest.mark.parametrize("split_qkv, per_layer, total", [(True, 862_208, 22_417_408), (False, 763_904, 19_861_504)])
def test_afm_3b_adapter_parameter_counts_match_the_spec(split_qkv: bool, per_layer: int, total: int) -> None:
    """Spec 5.1, rank 16 on every attention and FFN projection: separate q, k, v 16 (3 * 3072 + 40 * 128) per
    layer on our fused qkv (three A of 16 x 3072, one B of 5120 x 16 cut into q, k, v rows), or one pair on the
    fused projection 16 (3072 + 5120); o 16 (3072 + 3072); the gate, up and down projections 16 (3072 + 8064) each
    (gate and up share our fused proj_1, split the same way)."""
    model = build_decoder(preset("afm_3b"), "meta")
    apply_lora(model, LoRAConfig(rank=16, split_qkv=split_qkv))
    qkv = model.layers[0].attn.qkv_proj
    assert qkv.parts == ([3072, 1024, 1024] if split_qkv else [5120])
    assert qkv.lora_A.shape[1:] == ((48 if split_qkv else 16), 3072) and qkv.lora_B.shape[1:] == (5120, 16)
    assert sum(p.numel() for layer in lora_layers(model.layers[0]).values() for p in (layer.lora_A, layer.lora_B)) \
        == per_layer
    assert lora_parameters(model) == total
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)  # the base is frozen


def test_a_new_adapter_leaves_the_outputs_exactly_unchanged(base) -> None:
    tokens = torch.randint(0, 512, (2, 10))
    before = base(tokens)
    apply_lora(base, LoRAConfig(rank=4))
    assert torch.equal(base(tokens), before)
    assert all(layer.lora_A.abs().sum() > 0 for layer in lora_layers(base).values())  # only B starts at zero


def test_merged_adapter_computes_what_the_unmerged_one_does(base) -> None:
    apply_lora(base, LoRAConfig(rank=4, alpha=8))
    randomise(base, 1)
    tokens = torch.randint(0, 512, (2, 10))
    unmerged = base(tokens)
    assert not torch.allclose(unmerged, build_decoder(preset("afm_micro")).eval()(tokens))
    merge_lora(base)
    assert not lora_layers(base)
    torch.testing.assert_close(base(tokens), unmerged, rtol=1e-5, atol=1e-5)


def test_split_projections_are_separate_lora_on_q_k_and_v(base) -> None:
    attn = base.layers[1].attn
    W = attn.qkv_proj.weight.detach().clone()
    apply_lora(base, LoRAConfig(rank=2, alpha=4))
    randomise(base, 2)
    layer = attn.qkv_proj
    x = torch.randn(3, 64)
    sizes = [attn.n_q * 16, attn.n_kv * 16, attn.n_kv * 16]
    A, B = layer.lora_A[0].split(2), layer.lora_B[0].split(sizes)
    separate = [w @ x.T + 2.0 * b @ (a @ x.T) for w, a, b in zip(W.split(sizes), A, B)]  # q, k, v each on its own
    torch.testing.assert_close(layer(x), torch.cat(separate).T)


@pytest.mark.parametrize("length", [9, 1])
def test_a_batch_mixing_adapters_gives_each_row_its_own_adapter_alone(base, length: int) -> None:
    """Slots 0 and 1 hold two adapters of different ranks; rows pick 0, 1, none, 1. Each row must equal the model
    carrying only that adapter (or the bare base): 9 tokens a row gather each row's adapter, one token a row (a
    decode step, 4 rows >= 2 slots) runs every slot and keeps each row's own."""
    tokens = torch.randint(0, 512, (4, length))
    plain = base(tokens)
    singles = []
    for seed, rank in ((3, 4), (4, 2)):
        single = build_decoder(preset("afm_micro")).eval()
        single.load_state_dict(base.state_dict())
        apply_lora(single, LoRAConfig(rank=rank, alpha=2 * rank))
        randomise(single, seed)
        singles.append(single)
    selection = apply_lora(base, LoRAConfig(rank=4), slots=2)
    for slot, single in enumerate(singles):
        load_adapter_state(base, adapter_state(single), single_scale(single), slot)
    ids = torch.tensor([0, 1, -1, 1])
    with selection.rows(ids):
        mixed = base(tokens)
    expected = torch.stack([singles[0](tokens[:1])[0], singles[1](tokens[1:2])[0], plain[2],
                            singles[1](tokens[3:4])[0]])
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-5)
    assert selection.ids is None  # restored after the forward


def test_an_adapter_that_does_not_fit_the_bank_is_refused(base) -> None:
    wider = build_decoder(preset("afm_micro")).eval()
    apply_lora(wider, LoRAConfig(rank=8))
    partial = build_decoder(preset("afm_micro")).eval()
    apply_lora(partial, LoRAConfig(rank=4, targets=["out_proj"]))
    apply_lora(base, LoRAConfig(rank=4))
    with pytest.raises(ValueError, match="does not fit slots of 3 parts x rank 4"):
        load_adapter_state(base, adapter_state(wider), 1.0)
    with pytest.raises(ValueError, match="does not match the model's LoRA layers: missing"):
        load_adapter_state(base, adapter_state(partial), 1.0)


def test_bad_lora_configs_are_named() -> None:
    with pytest.raises(ValueError, match="choose among qkv_proj, out_proj, proj_1, proj_2"):
        LoRAConfig(targets=["q_proj"])
    with pytest.raises(ValueError, match="rank=0"):
        LoRAConfig(rank=0)
