"""Speculative Streaming fine-tuning outside Ray: the SQL task and its pairs as training rows (bad pairs counted),
the worker's labels (completion tokens only, stream j shifted by j), what it trains, that a few steps lower the
loss, and that its export is the init decoder with streams whose outputs equal the LoRA model's."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from raytrain.checkpoint.hf import load_pretrained, model_state, save_pretrained
from raytrain.data import sql
from raytrain.data.sft import PairsDataConfig, pair_rows, prompt_ids
from raytrain.data.tokenizer import to_files
from raytrain.models.decoder import DecoderConfig, build_decoder
from raytrain.train import tasks
from raytrain.train.objectives import IGNORE_INDEX


def test_sql_pairs_are_a_function_of_the_seed_and_held_out_prompts_avoid_training_ones() -> None:
    train = list(sql.records(300, 0))
    assert train == list(sql.records(300, 0)) and train != list(sql.records(300, 1))
    assert {r["template"] for r in train} == set(sql.TEMPLATES)
    held_out = list(sql.records(100, 1, exclude={r["prompt"] for r in train}))
    assert not {r["prompt"] for r in held_out} & {r["prompt"] for r in train}
    example = train[0]
    table = example["prompt"].split("CREATE TABLE ")[1].split(" ")[0]
    assert example["completion"].startswith("SELECT ") and f"FROM {table}" in example["completion"]


def test_pairs_become_rows_with_the_prompt_in_the_chat_template_and_bad_ones_are_counted(tokenizer) -> None:
    cfg = PairsDataConfig(seq_len=48)
    lines = [json.dumps({"prompt": "Count rows.", "completion": "SELECT COUNT(*) FROM t"}), "not json",
             json.dumps({"prompt": "x", "completion": 3}), json.dumps({"prompt": "x", "completion": "y " * 60}), ""]
    rows, skipped = pair_rows(lines, cfg, tokenizer)
    assert skipped == {"malformed_pairs": 2, "pairs_longer_than_seq_len": 1}
    head = prompt_ids(tokenizer, "Count rows.")
    body = tokenizer.encode("SELECT COUNT(*) FROM t", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert rows["tokens"].shape == (1, 49) and rows["tokens"][0, :len(head) + len(body)].tolist() == head + body
    assert rows["lengths"].tolist() == [len(head) + len(body)] and rows["prompt_lengths"].tolist() == [len(head)]
    tokenizer.chat_template = "{% for m in messages %}<{{ m['content'] }}>{% endfor %}{% if add_generation_prompt %}:"\
                              "{% endif %}"
    try:
        assert tokenizer.decode(prompt_ids(tokenizer, "hi")) == "<hi>:"
    finally:
        tokenizer.chat_template = None


@pytest.fixture
def worker(tmp_path, tokenizer) -> tasks.SpecStreamWorker:
    cfg = DecoderConfig(name="init", vocab_size=512, d_model=32, n_layers=2, head_dim=16, q_heads=2, kv_heads=2,
                        ffn_dim=64, max_seq_len=512)
    torch.manual_seed(0)
    init = save_pretrained(tmp_path / "init", cfg, model_state(build_decoder(cfg)), to_files(tokenizer))
    task = tasks.SpecStreamTaskConfig(init=str(init), gamma=2, lora_rank=4)
    job = SimpleNamespace(task=task, model=task.model(cfg), data=PairsDataConfig(seq_len=320))
    torch.manual_seed(1)
    return tasks.worker(job, build_decoder(job.model), torch.float32, torch.device("cpu"))


def batch(tokenizer) -> dict[str, torch.Tensor]:
    lines = [json.dumps(r) for r in sql.records(4, 0)]
    rows, skipped = pair_rows(lines, PairsDataConfig(seq_len=320), tokenizer)
    assert not any(skipped.values())
    return {k: torch.from_numpy(v).long() for k, v in rows.items()}


def test_labels_cover_the_completion_and_each_stream_looks_further_ahead(worker, tokenizer) -> None:
    b = batch(tokenizer)
    tokens, labels, rows, padding = worker.inputs(b)
    assert tokens.shape[1] == int(b["lengths"].max()) - 1  # padding-only columns cut
    for i, (n, p) in enumerate(zip(b["lengths"].tolist(), b["prompt_lengths"].tolist())):
        main = labels[i, :, 0]
        assert main[p - 1:n - 1].tolist() == b["tokens"][i, p:n].tolist()  # the completion and EOS
        assert (main[:p - 1] == IGNORE_INDEX).all() and (main[n - 1:] == IGNORE_INDEX).all()
        assert labels[i, p - 1:n - 2, 1].tolist() == b["tokens"][i, p + 1:n].tolist()  # stream 1: one further
        assert rows[i, :n - p].tolist() == list(range(p - 1, n - 1)) and padding[i].sum() == rows.shape[1] - (n - p)


def test_the_worker_trains_lora_streams_and_adapter_and_exports_the_init_decoder_with_streams(
        worker, tokenizer, tmp_path) -> None:
    model = worker.model
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {n for n, _ in model.named_parameters() if "lora_" in n} | {
        "stream_embed", "prune_adapter.down.weight", "prune_adapter.up.weight"}
    assert worker.metrics == ("loss", "main_ce", "stream_ce", "early_exit_ce")
    inputs = worker.inputs(batch(tokenizer))
    engine = SimpleNamespace(module=model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss, parts = worker.loss(engine, inputs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        assert parts[0] == loss.detach() and len(parts) == 4
    assert losses[-1] < losses[0] - 0.5, losses
    export = save_pretrained(tmp_path / "export", worker.job.model, worker.export_state())
    tuned = load_pretrained(export).model
    with torch.no_grad():
        states, ours = tuned.forward_streams(inputs[0]), model.forward_streams(inputs[0])
        torch.testing.assert_close(states.main, ours.main, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(states.streams, ours.streams, rtol=1e-4, atol=1e-5)
