"""The AFM recipe through Ray Train + DeepSpeed (2 CPU workers): its stages end to end with micro models, each
starting from the previous stage's final checkpoint; rerunning skips finished stages and resumes the unfinished one
(a stage whose every step adastar skips leaves its LR schedule where it was); adastar under ZeRO-2 and ZeRO-3 matches
a plain single-process float64 reference; bad input fails before any training."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from raytrain.checkpoint.hf import latest_run_checkpoint, model_state, save_pretrained
from raytrain.commands import train
from raytrain.config import ConfigError
from raytrain.data.corpus import documents
from raytrain.data.text import TextDataConfig, tokenize_documents
from raytrain.data.tokenizer import to_files, train_bpe
from raytrain.models.decoder import build_decoder
from raytrain.train.config import ScheduleConfig
from raytrain.train.objectives import lm_loss, next_token_pairs
from raytrain.train.optim import cosine_lr
from tests.conftest import compose, preset
from tests.train.test_adastar import ReferenceAdaStar

pytestmark = pytest.mark.integration


def recipe_overrides(storage: Path, tokenizer_dir: str, *extra: str) -> list[str]:
    return ["recipe=afm_micro", "tracking=disabled", "sample.prompt=null", f"trainer.storage_path={storage}",
            "trainer.run_name=afm", f"data.tokenizer={tokenizer_dir}", *extra]


def weights(step_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(step_dir / "model" / "model.safetensors")


def meta(step_dir: Path) -> dict:
    return json.loads((step_dir / "model" / "raytrain.json").read_text())


def test_stages_chain_change_context_and_resume(ray_cluster, tmp_path, tokenizer_dir, tokenizer) -> None:
    """The micro recipe with its larger model given as a checkpoint (its `teacher` stage removed to save time):
    prune, then core (distilled), continued and context. continued runs at LR 0 and every context step is skipped
    (gradient norm above a tiny threshold), so each ends with exactly the weights it started from: the previous
    stage's. The first pass stops inside context; the second skips what finished and resumes context."""
    torch.manual_seed(0)
    teacher = save_pretrained(tmp_path / "teacher", preset("afm_micro_teacher"),
                              model_state(build_decoder(preset("afm_micro_teacher"))), to_files(tokenizer))
    given = ["~recipe.stages.teacher", f"recipe.stages.prune.prune.source={teacher}",
             f"recipe.stages.core.objective.teacher={teacher}", "recipe.stages.continued.optim.lr=0",
             "++recipe.stages.context.optim.skip_grad_norm=1e-9"]
    first = train.run(compose("train", recipe_overrides(tmp_path, tokenizer_dir, *given,
                                                        "++recipe.stages.context.trainer.stop_after_steps=2")))
    assert first["status"] == "stopped" and first["stage"] == "context"
    runs = tmp_path / "afm"
    stage = {name: latest_run_checkpoint(runs / f"afm.{name}") for name in ("core", "continued")}
    assert sorted(p.name for p in runs.iterdir()) == ["afm.context", "afm.continued", "afm.core", "afm.prune"]

    pruned = json.loads((runs / "afm.prune" / "model" / "config.json").read_text())
    assert (pruned["q_heads"], pruned["kv_heads"], pruned["ffn_dim"]) == (3, 1, 168)  # afm_micro cut from 6/2/672
    assert json.loads((runs / "afm.prune" / "model" / "raytrain.json").read_text())["method"] == "soft_topk"
    assert meta(stage["core"])["init_from"] == str(runs / "afm.prune" / "model")
    assert meta(stage["core"])["teacher"] == str(teacher)
    assert meta(stage["continued"])["init_from"] == str(stage["core"])
    for name, tensor in weights(stage["core"]).items():
        torch.testing.assert_close(weights(stage["continued"])[name], tensor, rtol=0, atol=0, msg=name)

    optim = "ds/step000000004/zero_pp_rank_0_mp_rank_00_optim_states.pt"
    state = torch.load(stage["continued"] / optim, weights_only=False)["optimizer_state_dict"]
    steps = {s["step"] for s in state["base_optimizer_state"]["state"].values()}
    assert steps == {6 + 4}  # carry_optimizer: adastar's step counts continue from core's 6

    second = train.run(compose("train", recipe_overrides(tmp_path, tokenizer_dir, *given)))
    assert second["status"] == "finished"
    for name in ("core", "continued"):  # finished stages were skipped, not rerun
        assert latest_run_checkpoint(runs / f"afm.{name}") == stage[name]
        assert second["outputs"][name] == str(stage[name])
    context = Path(second["outputs"]["context"])
    assert sorted(p.name for p in (runs / "afm.context").glob("step*")) == ["step000000002", "step000000004"]
    assert meta(context)["skipped_steps"] == 4  # counted across the resume
    schedule = torch.load(context / "ds" / "step000000004" / "mp_rank_00_model_states.pt",
                          weights_only=False)["lr_scheduler"]
    assert schedule["last_epoch"] == 0  # axlearn's schedule counts applied updates: none, so it never advanced
    for name, tensor in weights(stage["continued"]).items():
        torch.testing.assert_close(weights(context)[name], tensor, rtol=0, atol=0, msg=name)

    configs = {name: json.loads((Path(second["outputs"][name]) / "model" / "config.json").read_text())
               for name in ("core", "continued", "context")}
    assert [configs[n]["rope_theta"] for n in configs] == [500000, 500000, 6315089]
    assert [meta(Path(second["outputs"][n]))["seq_len"] for n in configs] == [32, 64, 128]
    assert configs["context"]["max_seq_len"] == 128


def test_adastar_under_zero2_and_zero3_matches_a_plain_reference(ray_cluster, tmp_path, tokenizer_dir,
                                                                  tokenizer) -> None:
    """Two workers, every training row the same sequence (so every micro-batch is known whatever the split): the
    weights after 2 steps under ZeRO-2 and ZeRO-3 equal a single-process run of the same model with the spec's
    update written out in float64 (`ReferenceAdaStar`). A tight per-tensor clip clips every update, so a partition
    layout that misplaced a tensor's elements would change the result."""
    doc = " ".join(documents()[0].split()[:20])
    (tmp_path / "same.jsonl").write_text("".join(json.dumps({"text": doc}) + "\n" for _ in range(64)))
    common = ["model=afm_micro", "optim=adastar", "optim.update_clip=0.05", "tracking=disabled",
              "sample.prompt=null", f"trainer.storage_path={tmp_path}", f"data.tokenizer={tokenizer_dir}",
              f"data.path={tmp_path / 'same.jsonl'}", "data.seq_len=32", "data.words_per_piece=24",
              "data.min_chars=10", "data.min_tokens=8", "trainer.micro_batch_size=2", "trainer.max_steps=2",
              "trainer.checkpoint_every=2", "schedule=afm", "schedule.warmup_steps=1"]
    cfg = compose("train", common)
    z2 = train.run(compose("train", [*common, "trainer.run_name=z2", "trainer.zero_stage=2"]))
    z3 = train.run(compose("train", [*common, "trainer.run_name=z3", "trainer.zero_stage=3"]))

    row = tokenize_documents([doc], TextDataConfig(seq_len=32, words_per_piece=24, min_chars=10, min_tokens=8),
                             tokenizer)
    tokens, labels = next_token_pairs(torch.from_numpy(row).long().repeat(2, 1), tokenizer.pad_token_id)
    torch.manual_seed(cfg.trainer.seed)
    model = build_decoder(preset("afm_micro"))
    names, params = zip(*model.named_parameters())  # tied head: the embedding appears once
    o = cfg.optim
    scale = min(o.mup_base_dim / model.cfg.d_model, 1.0)
    reference = ReferenceAdaStar(list(params), o.lr, o.weight_decay, [scale if n.startswith("layers.") and p.dim() == 2
                                                                        else 1.0 for n, p in zip(names, params)],
                                 o.update_clip, grad_clip=cfg.trainer.grad_clip)
    schedule = ScheduleConfig(**cfg.schedule)
    for t in (1, 2):
        model.zero_grad()
        lm_loss(model(tokens), labels, cfg.trainer.z_loss)[0].backward()
        reference.step([p.grad for p in params], s=cosine_lr(t, 1.0, schedule, cfg.trainer.max_steps))
        with torch.no_grad():
            for p, r in zip(params, reference.params):
                p.copy_(r)
    for run in (z2, z3):
        trained = weights(Path(run.checkpoint.path))
        for name, expected in zip(names, reference.params):
            torch.testing.assert_close(trained[name].double(), expected, rtol=0, atol=2e-5, msg=name)


@pytest.mark.parametrize("override, message", [
    ("recipe.stages.core.init=/no/such/checkpoint", "recipe.stages.core.init=/no/such/checkpoint is neither"),
    ("recipe.stages.core.init=teacher", "cannot start from stage teacher: layers.0.attn.out_proj.weight"),
    ("++recipe.stages.core.mixture={prose: 0, code: 0}", "must sum to a positive value"),
    ("++recipe.stages.core.mixture={prose: 1, web: 1}", "mixture names ['web']"),
    ("recipe.stages.prune.prune.source=core", "neither an earlier stage"),
    ("++recipe.stages.continued.trainer.num_workers=1", "carry_optimizer: trainer.num_workers is 1 here but 2"),
    ("++recipe.stages.core.optim.name=adamw", "optim.skip_grad_norm is an adastar option"),
])
def test_bad_recipes_are_refused_before_any_stage_runs(tmp_path, tokenizer_dir, override: str,
                                                       message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        train.run(compose("train", recipe_overrides(tmp_path, tokenizer_dir, override)))
    assert not (tmp_path / "afm").exists() or not any((tmp_path / "afm").glob("afm.*"))


def test_a_prune_target_larger_than_its_source_and_a_foreign_teacher_are_refused(ray_cluster, tmp_path,
                                                                                 tokenizer_dir) -> None:
    narrow = dataclasses.replace(preset("afm_micro"), name="narrow", ffn_dim=64)
    small = save_pretrained(tmp_path / "small", narrow, model_state(build_decoder(narrow)),
                            to_files(train_bpe(documents()[:5], 512)))
    with pytest.raises(ConfigError, match="target afm_micro is larger than the source narrow"):
        train.run(compose("train", recipe_overrides(tmp_path, tokenizer_dir,
                                                    f"recipe.stages.prune.prune.source={small}")))
    with pytest.raises(ConfigError, match="uses another tokenizer than this run"):
        train.run(compose("train", recipe_overrides(tmp_path, tokenizer_dir,
                                                    f"recipe.stages.core.objective.teacher={small}",
                                                    "recipe.stages.core.init=none")))
    assert not any((tmp_path / "afm").glob("afm.*"))
