"""A 4-layer decoder whose vocabulary matches the session tokenizer, for engine and LazyLLM tests."""

from __future__ import annotations

import pytest
import torch

from raytrain.models.decoder import DecoderConfig, LayerScaling, build_decoder


@pytest.fixture
def lm() -> torch.nn.Module:
    cfg = DecoderConfig(name="engine", vocab_size=512, d_model=64, n_layers=4, head_dim=16, max_seq_len=256,
                        layer_scaling=LayerScaling(gqa_group=2, ffn_divisor=32))
    torch.manual_seed(0)
    return build_decoder(cfg).eval()
