"""The serve config: the committed serving/config.yaml is what conf/serve* emits, every option emits a config that
Serve's own schema accepts and that builds the application, several models sit side by side, and mistakes are named
before Ray starts."""

from __future__ import annotations

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from raytrain.cli import CONF_DIR
from raytrain.commands import serve as serve_command
from raytrain.checkpoint.hf import model_state, save_pretrained
from raytrain.config import ConfigError
from raytrain.data.tokenizer import to_files
from raytrain.models.decoder import DecoderConfig, build_decoder
from serving.config import ApiSpec, serve_config, serve_spec, to_yaml
from serving.guard import API_KEY_ENV, api_key
from tests.conftest import REPO, compose

COMMITTED = {"config.yaml": ["checkpoint=outputs/runs/tiny"],  # what serving/*.yaml are emitted with (conf/serve.yaml
             "cluster.yaml": ["serve=cluster", "checkpoint=/mnt/shared/runs/openelm-1-1b"]}  # and rayservice.yaml say)


def emitted(overrides: list[str]) -> dict:
    return serve_config(serve_spec(compose("serve", overrides).serve))


@pytest.mark.parametrize("name", COMMITTED)
def test_the_committed_serve_configs_are_what_the_config_emits(name: str) -> None:
    assert (REPO / "serving" / name).read_text() == to_yaml(emitted(COMMITTED[name])), \
        f"serving/{name} is stale: run `raytrain serve emit=serving/{name} {' '.join(COMMITTED[name])}`"


@pytest.mark.parametrize("option", sorted(f.stem for f in (CONF_DIR / "serve").glob("*.yaml")))
def test_each_serve_option_emits_a_config_serve_accepts(option: str) -> None:
    from serving.app import build_app

    # a batch above the default deployment's 16 ongoing requests: the replica's args carry no deployment options
    config = emitted([f"serve={option}", "checkpoint=/ckpt", "generation=lazy", "generation.max_batch_size=64",
                      "serve.models.default.deployment.max_ongoing_requests=128"])
    schema = ServeDeploySchema.model_validate(yaml.safe_load(to_yaml(config)))  # what `serve run`/`deploy` parse
    app = schema.applications[0]
    assert app.import_path == "serving.app:build_app"
    assert [d.name for d in app.deployments] == ["OpenAIIngress", "model-default"]
    model = app.args["models"]["default"]
    assert model["engine"]["lazy"] and model["weights"] == "dense" and model["checkpoint"] == "/ckpt"
    assert model["engine"]["max_batch_size"] == 64 and app.deployments[1].max_ongoing_requests == 128
    assert all(d.max_queued_requests >= 0 for d in app.deployments)  # no unbounded queue anywhere
    assert build_app(app.args) is not None  # the import path builds from exactly these args
    if option == "cluster":
        assert app.deployments[1].ray_actor_options.num_gpus == 1


def test_models_sit_side_by_side_each_with_its_decoding_mode() -> None:
    config = emitted(["checkpoint=/a", "+serve.models.lazy={checkpoint:/b,engine:{lazy:true}}",
                      "+serve.models.ss={checkpoint:/c,engine:{specstream:{top_k:3}}}"])
    app = config["applications"][0]
    models = app["args"]["models"]
    assert {n: m["engine"]["lazy"] for n, m in models.items()} == {"default": False, "lazy": True, "ss": False}
    assert models["ss"]["engine"]["specstream"]["top_k"] == 3 and models["default"]["engine"]["specstream"] is None
    assert [d["name"] for d in app["deployments"]] == ["OpenAIIngress", "model-default", "model-lazy", "model-ss"]


@pytest.mark.parametrize("overrides, message", [
    ([], "serve.models.default.checkpoint is not set"),
    (["serve.models.default.deployment.max_queued_requests=-1"], "max_queued_requests=-1: must be >= 0"),
    (["serve.models.default.weights=seedlm"], "serve.models.default.weights='seedlm' is unknown; known: dense, compressed"),
    (["generation.max_batch_size=32"], "max_ongoing_requests=16 is below engine.max_batch_size=32"),
    (["serve.models.default.limits.max_output_tokens=many"], "serve.models.default.limits.max_output_tokens"),
    (["serve.models.default.device=tpu"], "serve.models.default.device='tpu'"),
    (["serve.models.default.deployment.autoscaling_config.max_replicas=0"], "max_replicas >= 1"),
    (["~serve.models.default"], "serve.models is empty"),
    (["serve.api.api_key=a", "serve.api.api_key_file=/k"], "serve.api: set api_key or api_key_file, not both"),
    (["serve.api.max_body_bytes=0"], "serve.api.max_body_bytes must be > 0"),
    (["serve.api.probe_timeout_s=-1"], "serve.api.probe_timeout_s must be > 0"),
    (["generation.superposition.top_k=-2"], "serve.models.default.engine.superposition.top_k=-2 must be >= 0"),
    (["serve.models.default.limits.max_documents=0"], "serve.models.default.limits.max_documents must be > 0"),
    (["generation=lazy", "+serve.models.default.adapters.a=/x"],
     "serve.models.default.adapters: LoRA adapters are served with engine.lazy=false"),
    (["serve.models.default.adapter_slots=0"], "serve.models.default.adapter_slots=0 must be >= 1"),
    (["serve.models.default.store_shards.count=0"], "serve.models.default.store_shards.count=0 must be >= 1"),
    (["serve.models.default.store_shards.count=2"],
     "serve.models.default.store_shards.count=2: shards score superposed paths; set engine.superposition.enabled"),
    (["serve.models.default.store_shards.count=2", "generation=superposition", "generation.superposition.hops=2"],
     "serve.models.default.engine.superposition.hops=2: a sharded store runs one round"),
    (["serve.models.default.store_shards.num_gpus=-1"], "serve.models.default.store_shards: num_cpus and num_gpus"),
])
def test_config_mistakes_are_named(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        serve_spec(compose("serve", [*overrides, "checkpoint=/ckpt"] if overrides else []).serve)


def test_the_api_key_comes_from_config_then_file_then_environment(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    (tmp_path / "key").write_text("from-file\n")
    (tmp_path / "empty").write_text("\n")
    assert api_key(ApiSpec(api_key="from-config")) == "from-config"
    assert api_key(ApiSpec(api_key_file=str(tmp_path / "key"))) == "from-file"
    assert api_key(ApiSpec()) == "from-env"
    monkeypatch.delenv(API_KEY_ENV)
    assert api_key(ApiSpec()) is None  # an open API
    with pytest.raises(ConfigError, match=r"api\.api_key_file: .*empty is empty"):
        api_key(ApiSpec(api_key_file=str(tmp_path / "empty")))
    with pytest.raises(ConfigError, match=r"api\.api_key_file: cannot read .*missing"):
        api_key(ApiSpec(api_key_file=str(tmp_path / "missing")))


def test_models_that_may_scale_to_zero_are_named_to_the_ingress() -> None:
    args = emitted(["checkpoint=/a", "+serve.models.cold={checkpoint:/b,deployment:{autoscaling_config:"
                    "{min_replicas:0}}}"])["applications"][0]["args"]
    assert args["scale_to_zero"] == ["cold"] and args["api"]["max_body_bytes"] > 0


def test_model_adapter_and_store_names_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"serve\.models\.my model: model names use"):
        serve_spec({"models": {"my model": {"checkpoint": "/x"}}})
    with pytest.raises(ConfigError, match=r"serve\.models\.m\.adapters\.a:b: adapter names use"):
        serve_spec({"models": {"m": {"checkpoint": "/x", "adapters": {"a:b": "/y"}}}})
    with pytest.raises(ConfigError, match=r"serve\.models\.m\.document_stores\.a b: store names use"):
        serve_spec({"models": {"m": {"checkpoint": "/x", "document_stores": {"a b": "/y"}}}})
    with pytest.raises(ConfigError, match=r"serve\.models\.m\.document_stores\.docs: store names .* each names"):
        serve_spec({"models": {"m": {"checkpoint": "/x", "document_stores": {"docs": ""}}}})


def test_the_command_emits_the_yaml_and_checks_checkpoints_before_starting_ray(tmp_path) -> None:
    out = tmp_path / "serve.yaml"
    serve_command.run(compose("serve", ["checkpoint=/ckpt", f"emit={out}"]))
    assert out.read_text() == to_yaml(emitted(["checkpoint=/ckpt"]))
    with pytest.raises(ConfigError, match=r"serve\.models\.default\.checkpoint: checkpoint /nowhere: no such"):
        serve_command.run(compose("serve", ["checkpoint=/nowhere"]))


def test_the_command_checks_adapters_against_their_base_before_starting_ray(tmp_path, tokenizer) -> None:
    from tests.serving.conftest import random_adapter

    cfg = DecoderConfig(name="t", vocab_size=512, d_model=32, n_layers=1, head_dim=16, q_heads=2, kv_heads=2,
                        ffn_dim=64, max_seq_len=64)
    base, other = (save_pretrained(tmp_path / name, cfg, model_state(build_decoder(cfg)), to_files(tokenizer))
                   for name in ("base", "other"))
    cases = [({"a": random_adapter(base, tmp_path / "a", 0, 1), "x": random_adapter(other, tmp_path / "x", 0, 1)},
              r"adapters\.x: adapter .*x was trained on base .*other"),
             ({"gone": tmp_path / "gone"}, r"adapters\.gone: adapter .*gone: no such directory")]
    for adapters, message in cases:
        listed = [f"+serve.models.default.adapters.{name}={path}" for name, path in adapters.items()]
        with pytest.raises(ConfigError, match=r"serve\.models\.default\." + message):
            serve_command.run(compose("serve", [f"checkpoint={base}", *listed]))
