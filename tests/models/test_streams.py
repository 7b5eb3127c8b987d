"""Multi-stream attention and LoRA: the main stream is untouched by the streams, the efficient stream attention
equals one masked attention over main and stream rows, the counting rules of spec section 5, and LoRA merges back
into plain weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from raytrain.models.decoder import DecoderConfig, build_decoder
from raytrain.models.kv_cache import attention
from raytrain.models.lora import LoRAConfig, apply_lora, lora_layers, lora_parameters, merged_state
from raytrain.models.streams import StreamConfig, extra_parameters, medusa_parameters, msa_rows, tree_size

GAMMA = 3


@pytest.fixture
def streams_model() -> torch.nn.Module:
    cfg = DecoderConfig(name="ss", vocab_size=97, d_model=32, n_layers=3, head_dim=8, q_heads=4, kv_heads=2,
                        ffn_dim=64, max_seq_len=64, streams=StreamConfig(gamma=GAMMA, msa_layers=2, pruning_rank=8,
                                                                         embedding_std=0.5))
    torch.manual_seed(0)
    return build_decoder(cfg).eval()


@pytest.mark.parametrize("gamma, k, size, rows", [(4, 1, 5, 25), (3, 2, 15, 60), (4, 2, 31, 155), (3, 3, 40, 160),
                                                  (4, 3, 121, 605)])
def test_tree_sizes_and_msa_rows(gamma: int, k: int, size: int, rows: int) -> None:
    assert tree_size(gamma, k) == size and msa_rows(gamma, k) == rows


def test_extra_parameters_are_20h_and_medusa_counts_match_table_1(micro_cfg) -> None:
    with_streams = dataclasses.replace(micro_cfg, streams=StreamConfig(gamma=4, msa_layers=1, pruning_rank=8))
    counts = [sum(p.numel() for p in build_decoder(c, "meta").parameters()) for c in (micro_cfg, with_streams)]
    assert counts[1] - counts[0] == 20 * micro_cfg.d_model == extra_parameters(micro_cfg.d_model, 4, 8)
    assert [extra_parameters(h, 4, 8) for h in (2048, 4096)] == [40_960, 81_920]
    assert [medusa_parameters(h, v) for h, v in ((2048, 50272), (2048, 51200), (4096, 32000))] == [
        428_605_440, 436_207_616, 591_396_864]
    assert round(medusa_parameters(2048, 50272) / extra_parameters(2048, 4, 8)) == 10_464


def test_main_stream_is_unchanged_by_the_streams(streams_model) -> None:
    tokens = torch.randint(0, 97, (2, 11))
    rows = torch.tensor([[3, 7, 10], [0, 5, 5]])
    with torch.no_grad():
        plain = streams_model(tokens)
        for stream_rows in (None, rows):
            states = streams_model.forward_streams(tokens, stream_rows=stream_rows)
            torch.testing.assert_close(streams_model.logits(states.main), plain, rtol=0, atol=1e-6)
    assert states.streams.shape == (2, 3, GAMMA, 32) and states.early_exit.shape == (2, 11, 32)


def test_stream_attention_equals_one_masked_attention_over_main_and_stream_rows(streams_model) -> None:
    """Spec 2.2: stream j at t sees the main stream at positions <= t and streams 1..j at t; the reference runs the
    MSA layers as one SDPA over [main; streams] with that (T + Tγ)^2 mask."""
    T, m = 6, streams_model
    tokens = torch.randint(0, 97, (1, T))
    t_of = torch.cat([torch.arange(T), torch.arange(T).repeat_interleave(GAMMA)])  # each row's position
    j_of = torch.cat([torch.zeros(T, dtype=torch.long), torch.arange(1, GAMMA + 1).repeat(T)])  # 0 = main
    main_key = (j_of[None, :] == 0) & (t_of[None, :] <= t_of[:, None])
    own_stream = (j_of[None, :] > 0) & (j_of[:, None] > 0) & (t_of[None, :] == t_of[:, None]) & (
        j_of[None, :] <= j_of[:, None])
    mask = main_key | own_stream

    class Masked:
        def attend(self, layer, q, k, v):
            return attention(q, k, v, mask if q.shape[2] > T else None, q.shape[2] <= T)

    with torch.no_grad():
        states = m.forward_streams(tokens)
        cos, sin = m.rope(torch.arange(T)[None])
        x = m.run_layers(m.embed(tokens), cos, sin, None, range(1))
        h = torch.cat([x, (x[:, :, None] + m.stream_embed).flatten(1, 2)], dim=1)
        cos, sin = m.rope(t_of[None])
        h = m.run_layers(h, cos, sin, Masked(), range(1, 3))
    torch.testing.assert_close(states.main, h[:, :T], rtol=0, atol=1e-5)
    torch.testing.assert_close(states.streams, h[:, T:].unflatten(1, (T, GAMMA)), rtol=0, atol=1e-5)


def test_pruning_adapter_starts_as_the_early_exit_of_the_lower_layers(streams_model) -> None:
    tokens = torch.randint(0, 97, (1, 5))
    with torch.no_grad():
        states = streams_model.forward_streams(tokens)
        x = streams_model.run_layers(streams_model.embed(tokens), *streams_model.rope(torch.arange(5)[None]), None,
                                     range(1))
    torch.testing.assert_close(states.early_exit, x)


def test_lora_starts_as_the_base_model_and_merges_into_plain_weights(micro_model) -> None:
    tokens = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        base = micro_model(tokens)
        apply_lora(micro_model, LoRAConfig(rank=4, alpha=8.0))
        torch.testing.assert_close(micro_model(tokens), base)
        for module in lora_layers(micro_model).values():
            assert module.scale[0].item() == 2.0  # alpha / r
            module.lora_B.normal_(std=0.1)
        tuned = micro_model(tokens)
    assert not torch.allclose(tuned, base, atol=1e-3)
    assert all(not p.requires_grad for n, p in micro_model.named_parameters() if "lora_" not in n)
    # qkv: A (3 parts x r, d) + B (out, r); out_proj, proj_2: one part; proj_1 (gate, up): two parts
    shapes = micro_model.cfg.layer_shapes()
    expected = sum(4 * (3 * 64 + (s.q_heads + 2 * s.kv_heads) * 16) + 4 * (s.q_heads * 16 + 64)
                   + 4 * (2 * 64 + 2 * s.ffn_dim) + 4 * (s.ffn_dim + 64) for s in shapes)
    assert lora_parameters(micro_model) == expected
    plain = build_decoder(micro_model.cfg).eval()
    missing, unexpected = plain.load_state_dict(merged_state(micro_model), strict=False)
    assert not unexpected and set(missing) <= {"head.weight"}  # tied: stored once
    plain.tie_weights()
    with torch.no_grad():
        torch.testing.assert_close(plain(tokens), tuned, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(micro_model(tokens), tuned)  # merged_state left the LoRA model as it was
    assert len(lora_layers(micro_model)) == 4 * micro_model.cfg.n_layers
