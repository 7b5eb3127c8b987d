"""`raytrain train job=specstream` through Ray Train + DeepSpeed (one CPU worker): a tiny decoder fine-tuned on SQL
pairs; the export is the init decoder with streams and LoRA folded in, and it decodes speculatively to exactly its
greedy output. Bad pairs are skipped and counted."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import ray
import torch

from raytrain.checkpoint.hf import load_pretrained, model_state, save_pretrained
from raytrain.commands import train
from raytrain.data import sql
from raytrain.data.imagetext import skip_counter
from raytrain.data.retrieval import write_jsonl
from raytrain.data.tokenizer import to_files
from raytrain.infer.engine import Engine, EngineConfig, Request
from raytrain.infer.sampling import SamplingParams
from raytrain.infer.specstream import SpecStreamConfig
from raytrain.models.decoder import DecoderConfig, build_decoder
from tests.conftest import compose

pytestmark = pytest.mark.integration


def test_specstream_fine_tunes_on_pairs_and_decodes_losslessly(ray_cluster, tmp_path: Path, tokenizer) -> None:
    cfg = DecoderConfig(name="sqltiny", vocab_size=512, d_model=64, n_layers=3, head_dim=16, q_heads=4, kv_heads=2,
                        ffn_dim=128, max_seq_len=256)
    torch.manual_seed(0)
    init = save_pretrained(tmp_path / "init", cfg, model_state(build_decoder(cfg)), to_files(tokenizer))
    pairs = tmp_path / "train.jsonl"
    write_jsonl(pairs, sql.records(64, 0))
    with pairs.open("a") as f:
        f.write("not json\n" + json.dumps({"prompt": "x", "completion": "y " * 300}) + "\n")

    result = train.run(compose("train", [
        "job=specstream", f"init={init}", f"data.path={pairs}", "data.seq_len=256", "task.lora_rank=4",
        "tracking=disabled", f"trainer.storage_path={tmp_path / 'runs'}", "trainer.run_name=ss",
        "trainer.num_workers=1", "trainer.micro_batch_size=4", "trainer.max_steps=4", "trainer.checkpoint_every=4",
        "trainer.log_every=2",
        "schedule.warmup_steps=1"]))
    assert math.isfinite(result.metrics["loss"])
    assert ray.get(skip_counter("raytrain-skips-ss").get.remote()) == {"malformed_pairs": 1,
                                                                       "pairs_longer_than_seq_len": 1}

    tuned = load_pretrained(Path(result.checkpoint.path) / "model")
    assert tuned.config.streams.gamma == 4 and tuned.config.streams.msa_layers == 1  # 3 layers // 6, at least 1
    base = load_pretrained(init).model.state_dict()
    state = tuned.model.state_dict()
    assert not torch.equal(state["layers.0.attn.qkv_proj.weight"], base["layers.0.attn.qkv_proj.weight"])  # LoRA in
    assert torch.equal(state["embed.weight"], base["embed.weight"])  # frozen and not adapted
    assert set(state) - set(base) == {"stream_embed", "prune_adapter.down.weight", "prune_adapter.up.weight"}

    prompts = [r["prompt"] for r in sql.records(3, 1)]
    params = SamplingParams(max_new_tokens=16, temperature=0)
    model_dir = Path(result.checkpoint.path) / "model"
    plain = Engine.from_checkpoint(model_dir).generate([Request(p, params) for p in prompts])
    spec = Engine.from_checkpoint(model_dir, EngineConfig(specstream=SpecStreamConfig(prune_threshold=0.01)))
    assert [c.token_ids for c in spec.generate([Request(p, params) for p in prompts])] == [
        c.token_ids for c in plain]
