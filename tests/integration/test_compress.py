"""`raytrain compress` as a Ray job on a local cluster: a trained tiny model compressed with SeedLM and evaluated
against FP and RTN (held-out perplexity), generation from the compressed checkpoint, a Hugging Face Llama checkpoint,
resuming a killed job, the Gaussian reference check through the CLI, and bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from raytrain.checkpoint.hf import CheckpointError, linear_weight_names, model_state, save_pretrained
from raytrain.commands import compress, generate
from raytrain.config import ConfigError
from raytrain.data.corpus import documents
from raytrain.data.tokenizer import to_files
from raytrain.models.decoder import DecoderConfig, build_decoder
from raytrain.pipelines.compress import CompressError
from tests.conftest import REPO, compose

pytestmark = pytest.mark.integration
K12 = ["seedlm.K=12", "seedlm.taps=[0,1,2,8]"]  # 4095 candidates: the same job, 16x cheaper


def run_compress(*overrides: str) -> dict:
    return compress.run(compose("compress", list(overrides)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer, micro_cfg_512) -> Path:
    """The micro decoder trained for 300 AdamW steps on the embedded corpus (plain PyTorch, ~10 s on 2 cores), so
    that perplexity on held-out text means something (a uniform guess scores 512)."""
    torch.manual_seed(0)
    model = build_decoder(micro_cfg_512)
    ids = torch.tensor([t for d in documents() for t in tokenizer.encode(d)])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        start = torch.randint(0, len(ids) - 65, (16,), generator=g)
        batch = ids[start[:, None] + torch.arange(65)]
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return save_pretrained(tmp_path_factory.mktemp("trained") / "ckpt", micro_cfg_512, model_state(model.eval()),
                           to_files(tokenizer))


@pytest.fixture(scope="module")
def micro_cfg_512() -> DecoderConfig:
    from raytrain.models.decoder import LayerScaling

    return DecoderConfig(name="micro", vocab_size=512, d_model=64, n_layers=2, head_dim=16, max_seq_len=64,
                         layer_scaling=LayerScaling(gqa_group=2, ffn_divisor=32))


def test_a_trained_model_compressed_with_seedlm_is_evaluated_and_still_generates(ray_cluster, trained, tmp_path,
                                                                                   capsys) -> None:
    out = tmp_path / "seedlm4"
    summary = run_compress(f"checkpoint={trained}", f"out={out}", "eval=true", "evaluation.max_tokens=4096",
                           "evaluation.seq_len=64", "job.weights_per_task=16384")
    assert summary["bits_per_weight"] == 4.0 and summary["tensors_compressed"] == 8
    assert 0.09 < summary["mean_relative_error"] < 0.15  # the real K=16 search on trained weights
    results = summary["eval"]["results"]
    assert set(results) == {"fp", "seedlm", "rtn"} and summary["eval"]["eval_tokens"] == 4096
    assert results["fp"]["perplexity"] < 200  # trained: far better than the uniform 512
    assert results["fp"]["perplexity"] < results["seedlm"]["perplexity"] < 1.3 * results["fp"]["perplexity"]
    assert results["rtn"]["bits_per_weight"] > 4  # scales counted: 4 + 16 / min(128, row length)
    assert results["seedlm"]["mean_relative_error"] == pytest.approx(summary["mean_relative_error"], rel=1e-6)
    assert not out.with_name("seedlm4.partial").exists()
    capsys.readouterr()
    generate.run(compose("generate", [f"checkpoint={out}", "prompt=The if", "max_new_tokens=8", "temperature=0",
                                      "device=cpu"]))  # `raytrain generate checkpoint=OUT`, unchanged
    text = capsys.readouterr().out
    assert text.startswith("The if") and len(text.strip()) > len("The if")


def test_a_hugging_face_llama_checkpoint_is_compressed_and_evaluated(ray_cluster, tokenizer, tmp_path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                         bos_token_id=1, eos_token_id=2, pad_token_id=3))
    llama.save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    names = linear_weight_names(tmp_path / "llama")
    assert len(names) == 14 and "lm_head.weight" not in names and "model.layers.1.mlp.down_proj.weight" in names
    summary = run_compress(f"checkpoint={tmp_path / 'llama'}", f"out={tmp_path / 'out'}", "method=rtn", "bits=3",
                           "eval=true", "evaluation.max_tokens=1024", "evaluation.baselines=[rtn,seedlm]",
                           "seedlm.K=8", "seedlm.taps=[0,2,3,4]")
    results = summary["eval"]["results"]
    assert summary["tensors_compressed"] == 14 and set(results) == {"fp", "rtn", "seedlm"}
    assert all(r["perplexity"] > 1 for r in results.values())
    assert results["seedlm"]["bits_per_weight"] > 3  # rows of 64 / 96 weights padded to whole blocks of 12
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_a_killed_job_resumes_where_it_stopped(ray_cluster, trained, tmp_path) -> None:
    """Kill the driver once its first row ranges are on disk; the rerun skips them and writes exactly what an
    uninterrupted run writes."""
    address = ray_cluster.get_runtime_context().gcs_address
    args = [f"checkpoint={trained}", "job.weights_per_task=2048", "job.max_in_flight=1", *K12]
    cmd = [sys.executable, "-m", "raytrain", "compress", f"out={tmp_path / 'killed'}", f"ray.address={address}", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    parts = tmp_path / "killed.partial" / "parts"
    deadline = time.time() + 300
    while not (parts.is_dir() and any(parts.glob("*.safetensors"))) and proc.poll() is None and \
            time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed").exists(), "the job ended before it could be killed"
    resumed = run_compress(f"out={tmp_path / 'killed'}", *args)
    assert 0 < resumed["row_ranges_resumed"] < resumed["row_ranges"]
    straight = run_compress(f"out={tmp_path / 'straight'}", *args)
    assert straight["row_ranges_resumed"] == 0
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("killed", "straight"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_palettized_4_bit_checkpoint_is_evaluated_and_generates(ray_cluster, trained, tmp_path, capsys) -> None:
    out = tmp_path / "pal4"
    summary = run_compress(f"checkpoint={trained}", f"out={out}", "method=palettize", "bits=4", "eval=true",
                           "evaluation.max_tokens=4096", "evaluation.seq_len=64", "job.weights_per_task=4096")
    assert summary["tensors_compressed"] == 9 and summary["embedding_bits_per_weight"] == 8 + 16 / 64
    results = summary["eval"]["results"]
    assert results["palettize"]["bits_per_weight"] == pytest.approx(summary["bits_per_weight"])
    assert results["fp"]["perplexity"] < results["palettize"]["perplexity"] < 1.3 * results["fp"]["perplexity"]
    assert results["palettize"]["mean_relative_error"] < results["rtn"]["mean_relative_error"]
    capsys.readouterr()
    generate.run(compose("generate", [f"checkpoint={out}", "prompt=The if", "max_new_tokens=8", "temperature=0",
                                      "device=cpu"]))
    assert capsys.readouterr().out.startswith("The if")


def test_mixed_palettization_allocates_by_importance_and_resumes(ray_cluster, trained, tmp_path) -> None:
    """A job stopped after the squared gradients and a third of its row ranges finishes from there."""
    from raytrain.pipelines.compress import JobConfig, _prepare_work_dir, _run_fisher, _run_tasks, plan_job, run_job

    cfg = compose("compress", ["method=palettize", "bits=mixed", "target_bpw=3.5", "palettize.calibration_tokens=2048"])
    embedding, mixed = compress.palettize_options(cfg)
    plan = plan_job(trained, tmp_path / "mixed", "palettize", compress.codec_configs(cfg)["palettize"],
                    JobConfig(weights_per_task=2048), embedding, mixed)
    assert all(s.start % 16 == 0 for s in plan.shards)  # ranges start on whole groups of rows
    _prepare_work_dir(plan)
    _run_fisher(plan)
    _run_tasks(plan, plan.shards[:len(plan.shards) // 3])
    summary = run_job(plan)
    assert summary["row_ranges_resumed"] == len(plan.shards) // 3 > 0
    assert 3.0 < summary["bits_per_weight"] <= 3.5 and set(summary["tensor_bits"].values()) == {2, 4}
    assert sum(summary["weights_at_bits"].values()) == summary["weights_compressed"]
    record = json.loads((tmp_path / "mixed" / "config.json").read_text())["raytrain_compression"]
    assert record["tensor_bits"] == summary["tensor_bits"] and record["importance"] == "fisher"


def test_gaussian_reference_check_prints_one_json_object() -> None:
    cli = subprocess.run([sys.executable, "-m", "raytrain", "compress", "matrix=gaussian", "rows=64", "cols=96",
                          "seed=1", "device=cpu"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    summary = json.loads(cli.stdout)  # the whole of stdout is one JSON object
    assert summary["bits_per_weight"] == 4.0 and 0.118 <= summary["mean_relative_error"] <= 0.128
    assert summary["rtn"]["bits_per_weight"] == pytest.approx(4 + 16 / 96)  # one fp16 scale per row of 96


@pytest.mark.parametrize("overrides, error, message", [
    (["method=gptq"], ConfigError, "method='gptq' is unknown; known: palettize, rtn, seedlm"),
    (["bits=5"], ConfigError, "bits=5: method=seedlm has no setting at these bits; use 3 or 4"),
    (["bits=mixed"], ConfigError, "bits=mixed is a palettization setting; use method=palettize"),
    (["method=palettize", "bits=mixed", "target_bpw=1.5", "checkpoint={src}", "out={tmp}/o"], CompressError,
     "target_bpw=1.5: the narrowest setting already needs 2.0"),
    (["method=palettize", "bits=mixed", "palettize.calibration=embedded:web", "checkpoint={src}", "out={tmp}/o"],
     CompressError, "palettize.calibration=embedded:web: no such embedded source"),
    (["seedlm.taps=[0,1]"], ConfigError, "seedlm.taps: .* not maximal-length"),
    (["seedlm.exponent_rule=floor"], ConfigError, "seedlm: .*exponent_rule='floor'"),
    (["out=/tmp/x"], ConfigError, "checkpoint=PATH and out=PATH are required"),
    (["checkpoint={tmp}/missing", "out={tmp}/o"], CheckpointError, "no such directory"),
    (["checkpoint={tmp}/nolinear", "out={tmp}/o"], CompressError, "has no linear layers to compress"),
    (["checkpoint={src}", "out={src}"], CompressError, "already holds files"),
    (["checkpoint={src}", "out={tmp}/o", "eval=true", "evaluation.text={tmp}/none.txt"], CompressError,
     "evaluation.text=.*none.txt: no such file"),
])
def test_bad_input_is_named(trained, micro_cfg_512, tmp_path, overrides, error, message) -> None:
    nolinear = dataclasses.replace(micro_cfg_512, n_layers=0, layer_scaling=None, q_heads=1, kv_heads=1, ffn_dim=8)
    save_pretrained(tmp_path / "nolinear", nolinear, model_state(build_decoder(nolinear)))
    filled = [o.format(tmp=tmp_path, src=trained) for o in overrides]
    with pytest.raises(error, match=message):
        run_compress(*filled)


def test_a_partial_job_of_other_settings_is_refused(trained, tmp_path) -> None:
    out = tmp_path / "o"
    (tmp_path / "o.partial").mkdir()
    (tmp_path / "o.partial" / "manifest.json").write_text(json.dumps({"method": "rtn"}))
    with pytest.raises(CompressError, match="holds a job with other config, method, shards, source"):
        run_compress(f"checkpoint={trained}", f"out={out}", *K12)
