"""Speculative Streaming in the engine (spec section 5): the tree, its mask and positions, the acceptance rule,
output equal to greedy decoding for several γ, k and τ (alone, batched, beside sampled requests, with chunked
prefill), several tokens per step with the KV cache equal to sequential decoding after every step and no stream
K/V ever written, pruning with τ -> 1 still exact, and bad configurations named."""

from __future__ import annotations

import pytest
import torch

from raytrain.config import ConfigError, to_dataclass
from raytrain.infer import specstream
from raytrain.infer.engine import Engine, EngineConfig, Request
from raytrain.infer.kv_cache import SlotKVCache
from raytrain.infer.sampling import SamplingParams
from raytrain.infer.specstream import SpecStreamConfig, TreeKV, accept, build_tree, tree_tokens
from raytrain.models.decoder import DecoderConfig, LayerScaling, build_decoder
from raytrain.models.streams import StreamConfig

PROMPTS = ["The if statement", "A", "Assignment statements are used to"]


def streams_lm(gamma: int = 4, pruning_rank: int = 8) -> torch.nn.Module:
    cfg = DecoderConfig(name="ss", vocab_size=512, d_model=64, n_layers=4, head_dim=16, max_seq_len=256,
                        layer_scaling=LayerScaling(gqa_group=2, ffn_divisor=32),
                        streams=StreamConfig(gamma=gamma, msa_layers=2, pruning_rank=pruning_rank, embedding_std=0.3))
    torch.manual_seed(0)
    return build_decoder(cfg).eval()


@pytest.fixture(scope="module")
def lm() -> torch.nn.Module:
    return streams_lm()


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0)


def spec_engine(lm, tokenizer, **fields) -> Engine:
    engine_fields = {k: fields.pop(k) for k in ("max_step_tokens",) if k in fields}
    return Engine(lm, tokenizer, EngineConfig(specstream=SpecStreamConfig(**fields), **engine_fields))


def test_tree_mask_positions_and_replicated_tokens_gamma_2_k_2() -> None:
    tree = build_tree(2, 2)
    assert ["".join(str(int(b)) for b in row) for row in tree.ancestors] == [
        "1000000", "1100000", "1010000", "1101000", "1100100", "1010010", "1010001"]
    assert tree.depth.tolist() == [0, 1, 1, 2, 2, 2, 2]
    tokens = tree_tokens(tree, torch.tensor([7]), torch.tensor([[[10, 11], [20, 21]]]))
    assert tokens.tolist() == [[7, 10, 11, 20, 21, 20, 21]]  # nodes 3 and 5 carry the same token
    cache = SlotKVCache([1], 4, n_slots=2, max_len=16, dtype=torch.float32, device=torch.device("cpu"))
    kv = TreeKV(cache, torch.tensor([1]), torch.tensor([3]), length=10)
    kv.use_rows(tree.ancestors[None], torch.arange(7)[None])
    assert ["".join(str(int(b)) for b in row) for row in kv.mask[0, 0]] == [
        "111" + "".join(str(int(b)) for b in row) for row in tree.ancestors]  # all committed KV + ancestors
    assert kv.write.tolist() == [[3, 4, 5, 6, 7, 8, 9]]  # flat slots after the context; positions are 3 + depth


def test_acceptance_toy() -> None:
    """g(0) = tok(2), g(2) = tok(5), g(5) = z: the path is 0 -> 2 -> 5, δ = 2, and 3 tokens are committed."""
    tree = build_tree(2, 2)
    tokens = torch.tensor([[7, 10, 11, 20, 21, 20, 21]])
    z = 99
    g = torch.tensor([[11, 21, 20, 5, 5, z, 5]])  # g(1) = tok(4), but node 1 is not on the path
    path, accepted = accept(tree, tokens, g)
    assert path.tolist() == [[0, 2, 5]] and accepted.tolist() == [2]
    assert g[0, path[0, -1]].item() == z  # the new root
    path, accepted = accept(tree, tokens, g, alive=torch.tensor([[1, 1, 1, 1, 1, 0, 1]], dtype=torch.bool))
    assert path.tolist() == [[0, 2, 2]] and accepted.tolist() == [1]  # node 5 pruned: stop at node 2


@pytest.mark.parametrize("gamma, k, tau, max_step_tokens", [(1, 1, 0.0, 512), (2, 2, 0.0, 512), (4, 2, 0.0, 512),
                                                             (4, 3, 0.0, 512), (3, 2, 0.02, 512), (4, 2, 0.0, 4)])
def test_output_equals_greedy_decoding_alone_and_batched(lm, tokenizer, gamma, k, tau, max_step_tokens) -> None:
    requests = [Request(p, greedy(n)) for p, n in zip(PROMPTS, (24, 9, 17))]
    plain = [c.token_ids for c in Engine(lm, tokenizer).generate(requests)]
    engine = spec_engine(lm, tokenizer, gamma=gamma, top_k=k, prune_threshold=tau, max_step_tokens=max_step_tokens)
    assert [c.token_ids for c in engine.generate(requests)] == plain
    assert [engine.generate([r])[0].token_ids for r in requests] == plain
    stats = engine.speculative
    assert stats.tokens == sum(map(len, plain)) * 2  # every token came from trees, the first one too
    assert len(stats.accepted) > 1 and max(stats.accepted) <= gamma  # several acceptance lengths were exercised


def test_sampled_requests_decode_plainly_beside_speculating_ones(lm, tokenizer) -> None:
    sampled = Request("x", SamplingParams(max_new_tokens=10, temperature=0.9, top_k=20, seed=3))
    penalised = Request("The", SamplingParams(max_new_tokens=8, temperature=0, repetition_penalty=1.3))
    requests = [Request(PROMPTS[0], greedy(20)), sampled, penalised]
    plain = [c.token_ids for c in Engine(lm, tokenizer).generate(requests)]
    engine = spec_engine(lm, tokenizer)
    deltas = list(engine.stream(requests))
    done = {d.index: d.completion for d in deltas if d.completion is not None}
    assert [done[i].token_ids for i in range(3)] == plain
    assert "".join(d.text for d in deltas if d.index == 0) == done[0].text
    assert engine.speculative.tokens == 20 and engine.decode_rows  # only request 0 speculated


def test_a_one_token_prompt_speculates_from_its_only_token(lm, tokenizer) -> None:
    request = Request([7], greedy(11))
    engine = spec_engine(lm, tokenizer)
    assert engine.generate([request])[0].token_ids == Engine(lm, tokenizer).generate([request])[0].token_ids
    assert engine.speculative.tokens == 11


def test_with_overlap_a_stopped_request_runs_no_tree_step_after_its_stop(lm, tokenizer) -> None:
    """A tree step already waits for its tokens, so its host work is not deferred behind the next step: a request
    that hits a stop string takes as many tree steps as without overlap."""
    text = Engine(lm, tokenizer).generate([Request(PROMPTS[2], greedy(30))])[0].text
    request = Request(PROMPTS[2], SamplingParams(max_new_tokens=30, temperature=0, stop=[text[len(text) // 2:][:3]]))
    runs = []
    for overlap in (False, True):
        engine = Engine(lm, tokenizer, EngineConfig(specstream=SpecStreamConfig(), overlap=overlap))
        runs.append((engine.generate([request])[0].token_ids, engine.speculative.forwards))
    assert runs[0] == runs[1] and len(runs[0][0]) < 30


def test_under_load_the_trees_narrow_to_k_1(lm, tokenizer) -> None:
    requests = [Request(p, greedy(12)) for p in PROMPTS]
    engine = spec_engine(lm, tokenizer, top_k=3, max_step_rows=5 * 121)  # one tree of k = 3, or three of k = 1
    assert [c.token_ids for c in engine.generate(requests)] == [
        c.token_ids for c in Engine(lm, tokenizer).generate(requests)]
    assert engine.speculative.widths[1] > 0 and engine.generate([requests[0]]) and engine.speculative.widths[3] > 0


@pytest.mark.parametrize("k", [1, 2])
def test_right_drafts_commit_gamma_plus_one_tokens_and_the_cache_equals_sequential_decoding(
        lm, tokenizer, monkeypatch, k) -> None:
    """Drafts set to the true continuation: every step accepts all γ draft tokens. After every step the committed
    length is the tokens so far minus the root, those KV equal plain decoding's, and only tree rows (never stream
    rows) were ever written."""
    gamma, n = 4, 23
    plain = Engine(lm, tokenizer)
    prompt = plain.encode(Request(PROMPTS[0]))
    reference = plain.generate([Request(prompt, greedy(n))])[0].token_ids
    plain_keys = [k[0].clone() for k in plain.runner.cache.keys]
    written = []
    update = TreeKV.update

    def counting_update(self, layer, q, k, v):
        written.append(k.shape[2])
        return update(self, layer, q, k, v)

    monkeypatch.setattr(specstream.TreeKV, "update", counting_update)
    engine = spec_engine(lm, tokenizer, top_k=k)
    out: list = []
    seq = engine.add_request(Request(prompt, greedy(n)), out.extend)
    engine.step()  # the prompt but its last token, prefilled as any prompt (not through the tree's cache)
    assert written == [] and seq.computed == len(prompt) - 1 and seq.sampled == 0
    steps = 0
    while seq.finish_reason is None:
        done = seq.sampled
        truth = reference[done:done + gamma] + [0] * gamma
        engine.speculative.drafts[seq.slot, :, 0] = torch.tensor(truth[:gamma])
        written.clear()
        engine.step()
        steps += 1
        assert written == [build_tree(gamma, k).size] * 4  # the tree's rows in every layer, no stream rows
        assert seq.sampled == min(done + gamma + 1, n)
        if seq.finish_reason is None:
            committed = seq.position  # the root's position: the KV length
            for layer, keys in enumerate(engine.runner.cache.keys):
                torch.testing.assert_close(keys[seq.slot, :, :committed], plain_keys[layer][:, :committed],
                                           rtol=1e-4, atol=1e-5)
    assert out[-1].completion.token_ids == reference and steps == -(-n // (gamma + 1))


def test_pruning_everything_but_the_root_still_gives_greedy_decoding(lm, tokenizer) -> None:
    requests = [Request(p, greedy(10)) for p in PROMPTS[:2]]
    engine = spec_engine(lm, tokenizer, prune_threshold=1.0)
    assert [c.token_ids for c in engine.generate(requests)] == [
        c.token_ids for c in Engine(lm, tokenizer).generate(requests)]
    assert set(engine.speculative.accepted) == {0} and engine.speculative.tokens == 20  # one token per step


def test_bad_configurations_are_named(tokenizer, lm) -> None:
    plain = build_decoder(DecoderConfig(name="plain", vocab_size=512, d_model=32, n_layers=2, head_dim=16, q_heads=2,
                                        kv_heads=2, ffn_dim=64, max_seq_len=64))
    with pytest.raises(ConfigError, match="generation.specstream needs a model with speculative streams"):
        spec_engine(plain, tokenizer)
    with pytest.raises(ConfigError, match="prune_threshold > 0 needs the tree-pruning adapter"):
        spec_engine(streams_lm(pruning_rank=0), tokenizer, prune_threshold=0.1)
    with pytest.raises(ConfigError, match="specstream.gamma=5: the model has 4 streams"):
        spec_engine(lm, tokenizer, gamma=5)
    with pytest.raises(ConfigError, match="generation.*top_k=0 must be >= 1"):
        to_dataclass(EngineConfig, {"specstream": {"top_k": 0}}, "generation")
    with pytest.raises(ConfigError, match="generation.*graph_width=-1 must be >= 0"):
        to_dataclass(EngineConfig, {"specstream": {"graph_width": -1}}, "generation")
