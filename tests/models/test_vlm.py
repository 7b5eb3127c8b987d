"""The VLM and Victor's drop against the spec's verification facts (section 3.3), with tiny random models: the
baseline and registers-only runs equal a plain decoder over the spliced sequence; the drop equals a full-length run
that hides visual keys from layer k on (with and without a text prefix); a padded batch with mixed visual lengths and
a text-only row equals its rows run alone; cached generation equals recomputing every step; per-layer KV lengths;
the FastV and keep-last ablations; pooled registers (the pooled regions, input dependence, a training step, and the
batch and generation facts); registers from a word's embedding; a checkpoint round trip keeps the registers bit for bit."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from raytrain.checkpoint.hf import load_pretrained, model_state, save_pretrained
from raytrain.infer.sampling import SamplingParams
from raytrain.infer.vlm import VLMRequest, collate, generate
from raytrain.models.decoder import DecoderConfig
from raytrain.models.kv_cache import attention
from raytrain.models.vit import ViTConfig
from raytrain.models.vlm import IGNORE, VictorConfig, VLMCache, VLMConfig, build_vlm

DECODER = DecoderConfig(name="dec", vocab_size=97, d_model=64, n_layers=4, head_dim=16, q_heads=4, kv_heads=2,
                        ffn_dim=128, max_seq_len=256, qk_norm=False)
TOWER = ViTConfig(name="tower", d_model=32, n_layers=2, n_heads=2, ffn_dim=64, num_classes=0, image_size=64,
                  pos_grid=4)  # 16 visual tokens
N = 16


def make(mode: str = "registers", registers: int = 3, drop: int = 2, reference=None, **victor):
    """A tiny VLM; with `reference`, its tower, projector and decoder weights (so modes differ only in Victor)."""
    torch.manual_seed(0)
    cfg = VLMConfig(name="t", image=TOWER, decoder=DECODER, image_layer=-1,
                    victor=VictorConfig(mode=mode, num_registers=registers, drop_layer=drop, **victor))
    model = build_vlm(cfg).eval()
    if reference is not None:
        shared = {k: v for k, v in reference.state_dict().items() if not k.startswith("registers.")}
        model.load_state_dict(shared, strict=False)
    return model


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(4, 97, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def single(before: list[int], after: list[int], labels: list[int] | None = None):
    return collate([(before, after, labels)], pad_id=0, left=False)


def plain_logits(model, parts: list[torch.Tensor]) -> torch.Tensor:
    """LLaVA's forward: the decoder over the concatenated embeddings, contiguous positions, plain causal attention."""
    dec = model.decoder
    x = torch.cat(parts)[None]
    S = x.shape[1]
    cos, sin = dec.rope_cos[None, None, :S], dec.rope_sin[None, None, :S]
    for i, block in enumerate(dec.layers):
        x = block(x, cos, sin, None, i)
    return dec.logits(x)[0]


@torch.no_grad()
@pytest.mark.parametrize("mode, drop", [("off", 2), ("registers", 4), ("registers", 9)])
def test_baseline_and_registers_without_drop_equal_a_plain_forward(mode: str, drop: int) -> None:
    """Facts 1 and 2: mode=off is LLaVA's forward; k >= n is that forward over a sequence holding the registers."""
    model = make(mode, drop=drop)
    before, after = ids(5, 1), ids(7, 2)
    image = torch.rand(1, 3, 64, 64)
    batch = single(before, after)
    batch.images = image
    out = model(batch)
    visual = model.visual_tokens(image)[0]
    registers = model.registers([visual])[0] if model.registers is not None else visual[:0]
    expected = plain_logits(model, [model.decoder.embed(torch.tensor(before)), visual, registers,
                                    model.decoder.embed(torch.tensor(after))])
    assert out.hidden.shape[1] == 5 + N + len(registers) + 7
    torch.testing.assert_close(model.logits(out)[0], expected, rtol=0, atol=1e-5)


class HideVisualKeys:
    """The reference by masking (fact 3): full length, original positions; from layer k on no query sees a visual
    key (a visual query sees itself, so its row is not empty; nothing reads it)."""

    def __init__(self, visual: torch.Tensor, drop: int) -> None:
        S = len(visual)
        self.causal = torch.ones(S, S, dtype=torch.bool).tril()
        self.hidden = (self.causal & ~visual[None]) | torch.eye(S, dtype=torch.bool)
        self.drop = drop

    def attend(self, layer: int, q, k, v):
        return attention(q, k, v, (self.hidden if layer >= self.drop else self.causal)[None, None], False)


@torch.no_grad()
@pytest.mark.parametrize("prefix", [1, 30])
@pytest.mark.parametrize("positions", ["keep", "renumber"])
def test_drop_equals_masking_the_visual_keys(prefix: int, positions: str) -> None:
    """Facts 3 and 4: Victor's dropped run gives the kept positions the logits and the loss of a full-length run
    whose layers >= k hide the visual keys; the text prefix survives the drop. `renumber` differs from it (positions
    are not the reference's)."""
    model = make(drop=2, position_ids=positions)
    before, after = ids(prefix, 3), ids(9, 4)
    answer = [IGNORE] * 6 + after[6:]  # the last 3 tokens supervised
    batch = single(before, after, [IGNORE] * prefix + answer)
    batch.images = torch.rand(1, 3, 64, 64)
    out = model(batch)

    h, tokens = model.splice(batch)
    reference = HideVisualKeys(tokens.visual[0], drop=2)
    cos, sin = model.decoder.rope(tokens.positions)
    for i, block in enumerate(model.decoder.layers):
        h = block(h, cos, sin, reference, i)
    kept = ~tokens.visual[0]
    logits = model.decoder.logits(h)[0, kept]
    labels = tokens.labels[0, kept]
    loss = F.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE)

    assert out.tokens.index[0].tolist() == kept.nonzero().squeeze(1).tolist()  # prefix, registers, suffix survive
    assert out.tokens.labels[0].tolist() == labels.tolist()
    if positions == "keep":
        torch.testing.assert_close(model.logits(out)[0], logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(out.loss, loss, rtol=0, atol=1e-5)
    else:
        assert out.tokens.positions[0].tolist() == list(range(kept.sum()))
        assert not torch.allclose(model.logits(out)[0], logits, atol=1e-3)


@torch.no_grad()
@pytest.mark.parametrize("left", [True, False])
@pytest.mark.parametrize("mode, init", [("off", "normal"), ("registers", "normal"), ("registers", "pooled"),
                                        ("fastv", "normal")])
def test_padded_batch_with_mixed_images_equals_each_row_alone(left: bool, mode: str, init: str) -> None:
    """Fact 5: rows with 16 and 9 visual tokens, a text-only row and a 30-token prefix, padded left or right."""
    model = make(mode, keep_visual=4, register_init=init)
    torch.manual_seed(1)
    rows = [(ids(3, 5), ids(4, 6), 16), (ids(2, 7), ids(11, 8), 9), (None, ids(6, 9), 0), (ids(30, 10), ids(2, 11), 16)]
    visual = [torch.randn(n, 64) if n else None for *_, n in rows]
    batch = collate([(before, after, None) for before, after, _ in rows], pad_id=0, left=left)
    batch.visual = visual
    out = model(batch)
    logits = model.logits(out)
    for b, (before, after, _) in enumerate(rows):
        alone = single(before, after) if before is not None else collate([(None, after, None)], 0, left=False)
        alone.visual = [visual[b]]
        one = model(alone)
        torch.testing.assert_close(logits[b, out.tokens.valid[b]], model.logits(one)[0], rtol=0, atol=2e-5)
        assert out.tokens.positions[b, out.tokens.valid[b]].tolist() == one.tokens.positions[0].tolist()


@torch.no_grad()
def test_kv_lengths_per_layer_after_prefill() -> None:
    """Fact 7: S_b entries in layers < k, S_b - N_b in layers >= k (and S_b everywhere for the baseline)."""
    for mode, short in (("registers", True), ("off", False)):
        model = make(mode, registers=3, drop=2)
        rows = [(ids(3, 12), ids(5, 13), None), (ids(1, 14), ids(2, 15), None)]
        batch = collate(rows, pad_id=0, left=True)
        batch.visual = [torch.randn(16, 64), torch.randn(7, 64)]
        cache = VLMCache(4, 64)
        model(batch, cache)
        M = 3 if mode == "registers" else 0
        full = [3 + 16 + M + 5, 1 + 7 + M + 2]
        for layer in range(4):
            expected = [s - n for s, n in zip(full, (16, 7))] if short and layer >= 2 else full
            assert cache.kv_lengths(layer).tolist() == expected


@torch.no_grad()
@pytest.mark.parametrize("mode, init", [("registers", "normal"), ("registers", "pooled"), ("fastv", "normal"),
                                        ("off", "normal")])
def test_cached_generation_equals_recomputing_every_step(mode: str, init: str) -> None:
    """Fact 6: greedy tokens with the per-layer KV cache (drop active) equal a full forward at every step; the
    requests run together in one padded batch, each recomputation alone."""
    model = make(mode, drop=2, keep_visual=5, register_init=init).double()
    if init == "pooled":  # a learned part that is not zero, so that both halves of the registers count
        model.registers.weight.data.normal_(generator=torch.Generator().manual_seed(3))
    torch.manual_seed(2)
    requests = [VLMRequest(ids(4, 16), ids(3, 17), torch.rand(3, 64, 64).double()),
                VLMRequest(ids(1, 18), ids(8, 19), torch.rand(3, 64, 64).double()),
                VLMRequest(ids(2, 20), ids(2, 21), None)]
    for r in requests:
        r.params = SamplingParams(max_new_tokens=6, temperature=0.0)
    cached = generate(model, requests, eos_id=None, pad_id=0)
    for r, tokens in zip(requests, cached):
        out: list[int] = []
        for _ in range(6):
            batch = single(r.before, r.after + out) if r.image is not None else single([], r.before + r.after + out)
            if r.image is None:
                batch.image_at[:] = -1
            else:
                batch.visual = [model.visual_tokens(r.image[None])[0]]
            full = model(batch)
            out.append(int(model.logits(full)[0, full.tokens.last()[0]].argmax()))
        assert tokens == out


@torch.no_grad()
def test_fastv_and_keep_last_visual_keep_their_visual_tokens() -> None:
    reference = make("off")
    batch = single(ids(2, 22), ids(4, 23))
    batch.visual = [torch.randn(16, 64)]
    last = make("keep_last_visual", drop=1, keep_visual=5, reference=reference)(batch)
    assert last.tokens.index[0].tolist() == [0, 1, *range(13, 18), 18, 19, 20, 21]  # the last 5 of indices 2..17
    fastv = make("fastv", drop=2, keep_visual=5, reference=reference)(batch)
    assert int(fastv.tokens.visual.sum()) == 5
    everything = make("fastv", drop=2, keep_visual=16, reference=reference)(batch)  # keeps all 16: the baseline
    torch.testing.assert_close(everything.hidden, reference(batch).hidden, rtol=0, atol=1e-5)


@torch.no_grad()
def test_pooled_registers_at_init_are_the_means_of_their_visual_regions() -> None:
    """register_init=pooled with its zero learned weight: a 4 x 4 grid gives 2 x 2 quadrants, a 3 x 3 grid 2 x 2
    overlapping windows (adaptive pooling's bins), 8 tokens (no square) 4 chunks of 2; each image's registers sit right
    after its visual tokens."""
    model = make(registers=4, register_init="pooled")
    assert not model.registers.weight.any()
    groups = {16: [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]],
              9: [[0, 1, 3, 4], [1, 2, 4, 5], [3, 4, 6, 7], [4, 5, 7, 8]],
              8: [[0, 1], [2, 3], [4, 5], [6, 7]]}
    rows = [(ids(2, 30), ids(3, 31), None), (ids(5, 32), ids(1, 33), None), (ids(1, 34), ids(4, 35), None)]
    batch = collate(rows, pad_id=0, left=False)
    batch.visual = [torch.randn(n, 64) for n in groups]
    h, tokens = model.splice(batch)
    for b, (n, members) in enumerate(groups.items()):
        start = len(rows[b][0]) + n  # the prefix, then the visual tokens
        expected = torch.stack([batch.visual[b][m].mean(0) for m in members])
        torch.testing.assert_close(h[b, start:start + 4], expected, rtol=0, atol=1e-6)
        assert not tokens.visual[b, start:start + 4].any() and tokens.visual[b, start - n:start].all()


@torch.no_grad()
def test_pooled_registers_differ_between_images_and_learned_ones_do_not() -> None:
    """Two images in one batch: their pooled registers differ, learned registers are the same weight in both rows."""
    images = torch.rand(2, 3, 64, 64)
    for init, differ in (("pooled", True), ("normal", False)):
        model = make(register_init=init)
        batch = collate([(ids(2, 36), ids(3, 37), None)] * 2, pad_id=0, left=False)
        batch.images = images
        h, _ = model.splice(batch)
        registers = h[:, 2 + N:2 + N + 3]
        assert torch.allclose(registers[0], registers[1]) != differ


def test_pooled_registers_train_their_learned_weight() -> None:
    """One optimizer step on a labelled batch: the gradient reaches the learned weight, the weight moves, and the
    registers stay the pooled tokens plus the new weight."""
    model = make(register_init="pooled").train()
    before, after = ids(3, 38), ids(6, 39)
    batch = single(before, after, [IGNORE] * 6 + after[3:])
    batch.images = torch.rand(1, 3, 64, 64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(batch).loss.backward()
    grad = model.registers.weight.grad
    assert grad is not None and grad.abs().sum() > 0 and torch.isfinite(grad).all()
    optimizer.step()
    assert model.registers.weight.abs().sum() > 0
    with torch.no_grad():
        h, _ = model.splice(batch)
        visual = model.visual_tokens(batch.images)[0]
    grid = visual.reshape(4, 4, -1)  # M = 3 on 4 x 4: 1 x 3 regions, adaptive bins over columns 0-1, 1-2, 2-3
    bands = torch.stack([grid[:, i:i + 2].mean((0, 1)) for i in range(3)])
    torch.testing.assert_close(h[0, 3 + N:3 + N + 3], bands + model.registers.weight, rtol=0, atol=1e-6)


@torch.no_grad()
def test_image_token_registers_are_the_mean_embedding_of_the_word_in_every_row() -> None:
    """register_init=image_token: zeros until the task copies the word's embedding in (the mean over its tokens),
    then every row is that embedding and the spliced registers carry it."""
    model = make(registers=4, register_init="image_token")
    assert not model.registers.weight.any()
    model.init_registers_from_tokens([5, 9])
    word = (model.decoder.embed.weight[5] + model.decoder.embed.weight[9]) / 2
    torch.testing.assert_close(model.registers.weight, word.expand(4, -1), rtol=0, atol=0)
    batch = single(ids(2, 40), ids(3, 41))
    batch.images = torch.rand(1, 3, 64, 64)
    h, _ = model.splice(batch)
    torch.testing.assert_close(h[0, 2 + N:2 + N + 4], word.expand(4, -1), rtol=0, atol=0)
    with pytest.raises(ValueError, match="at least one token id"):
        model.init_registers_from_tokens([])


def test_config_refuses_drop_at_layer_zero_and_unknown_modes() -> None:
    with pytest.raises(ValueError, match="drop_layer=0"):
        VictorConfig(drop_layer=0)
    with pytest.raises(ValueError, match="mode='prune'"):
        VictorConfig(mode="prune")
    with pytest.raises(ValueError, match="num_registers=0"):
        VictorConfig(num_registers=0)
    with pytest.raises(ValueError, match="register_init='word'; expected one of normal, zeros, pooled, image_token"):
        VictorConfig(register_init="word")


def test_registers_round_trip_a_checkpoint_bit_exactly(tmp_path) -> None:
    """Fact 9 (the artifact half): registers saved with the model load back bit for bit, and the loaded model
    computes what the saved one did."""
    model = make()
    with torch.no_grad():
        model.registers.weight.add_(torch.randn_like(model.registers.weight))
    path = save_pretrained(tmp_path / "vlm", model.cfg, model_state(model))
    loaded = load_pretrained(path).model
    assert torch.equal(loaded.registers.weight, model.registers.weight)
    assert dataclasses.asdict(loaded.cfg) == dataclasses.asdict(model.cfg)
    batch = single(ids(2, 24), ids(3, 25))
    batch.images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(batch).hidden, model(batch).hidden)
