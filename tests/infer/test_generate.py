"""KV-cached generation: equals full recomputation, streams and stops correctly, validates its inputs."""

from __future__ import annotations

import pytest
import torch

from raytrain.config import RaytrainError
from raytrain.infer.generate import generate_ids, generate_text, stream_text
from raytrain.infer.sampling import SamplingParams, filter_logits, next_token
from raytrain.models.decoder import build_decoder
from raytrain.models.kv_cache import KVCache


def test_cached_greedy_generation_equals_full_recompute(micro_model) -> None:
    prompt = [1, 5, 9, 14, 3, 7]
    cached = list(generate_ids(micro_model, prompt, SamplingParams(max_new_tokens=20, temperature=0)))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(20):
            ids.append(int(micro_model(torch.tensor([ids]))[0, -1, :97].argmax()))
    assert cached == ids[len(prompt):]


def test_cache_logits_match_full_forward_for_every_step(micro_model) -> None:
    tokens = torch.randint(0, 97, (2, 16))
    cache = KVCache(len(micro_model.layers), 16)
    with torch.no_grad():
        full = micro_model(tokens)
        chunks = [micro_model(tokens[:, :5], cache=cache), micro_model(tokens[:, 5:9], cache=cache)]
        chunks += [micro_model(tokens[:, i:i + 1], cache=cache) for i in range(9, 16)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.lengths == [16, 16] and cache.seen == 16


def test_cache_refuses_to_overflow(micro_model) -> None:
    cache = KVCache(len(micro_model.layers), 4)
    with pytest.raises(ValueError, match="holds 4 tokens"):
        micro_model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def test_top_k_and_top_p_keep_the_right_tokens() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    assert torch.isfinite(filter_logits(logits, top_k=2, top_p=1.0)).tolist() == [[True, True, False, False]]
    # nucleus: 0.5 + 0.25 reaches 0.7, so the third token is outside
    assert torch.isfinite(filter_logits(logits, top_k=0, top_p=0.7)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_k=0, top_p=0.8)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(filter_logits(logits, top_k=0, top_p=0.1)).tolist() == [[True, False, False, False]]


def test_sampling_is_seeded_and_respects_top_k() -> None:
    logits = torch.randn(1, 50)
    params = SamplingParams(temperature=1.0, top_k=3, seed=0)
    draws = {int(next_token(logits, params, torch.Generator().manual_seed(i))) for i in range(200)}
    assert draws <= set(torch.topk(logits, 3).indices[0].tolist()) and len(draws) > 1


@pytest.mark.parametrize("kwargs, field", [({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -1}, "temperature"),
                                           ({"top_p": 0}, "top_p"), ({"top_k": -2}, "top_k"), ({"stop": [""]}, "stop")])
def test_invalid_sampling_parameters_are_named(kwargs, field) -> None:
    with pytest.raises(RaytrainError, match=field):
        SamplingParams(**kwargs)


def test_prompt_errors_come_before_any_compute(micro_model) -> None:
    with pytest.raises(RaytrainError, match="empty"):
        list(generate_ids(micro_model, [], SamplingParams()))
    with pytest.raises(RaytrainError, match="exceeds the model's 128 positions"):
        list(generate_ids(micro_model, [1] * 100, SamplingParams(max_new_tokens=29)))


def test_stream_pieces_join_to_the_full_text_and_stop_strings_cut(micro_cfg, tokenizer) -> None:
    micro_cfg.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    micro_model = build_decoder(micro_cfg).eval()
    params = SamplingParams(max_new_tokens=40, temperature=0)
    full = generate_text(micro_model, tokenizer, "The if statement", params)
    pieces = list(stream_text(micro_model, tokenizer, "The if statement", params))
    assert "".join(pieces) == full and len(pieces) > 1
    stop = full[len(full) // 2: len(full) // 2 + 2]
    stopped = generate_text(micro_model, tokenizer, "The if statement",
                            SamplingParams(max_new_tokens=40, temperature=0, stop=[stop]))
    assert stopped == full[:full.find(stop)]
