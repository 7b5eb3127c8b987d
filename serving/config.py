"""Typed settings of the Serve application, and the Serve config file they become.

`raytrain serve` composes `conf/serve.yaml` (with the `serve` group) into a `ServeSpec`; `serve_config` turns it into
the dictionary that `serve run` and `serve deploy` accept (Serve's `ServeDeploySchema`): one application whose
`args` are the models (checkpoint, weight format, engine config, limits) and the API's own protections (API key, body
limits, replica probing), and whose `deployments` carry what Serve itself manages (replicas and autoscaling, the
bounded queue and its 503 + Retry-After, resources, health checks) for the ingress and for each model. The same
dictionary is what `raytrain serve` deploys, so the committed `serving/config.yaml` is this output; edit
`conf/serve*`, never the YAML.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

import yaml

from raytrain.config import ConfigError, to_dataclass
from raytrain.infer.engine import EngineConfig
from raytrain.infer.path_shards import check_shardable

IMPORT_PATH = "serving.app:build_app"
INGRESS = "OpenAIIngress"
# Weight formats a model replica can load (`serving/model.py:load_engine`): dense weights (a compressed checkpoint is
# rebuilt dense on load), or a `raytrain compress` checkpoint kept compressed in memory (SeedLM's fused kernel on GPU).
WEIGHT_FORMATS = ("dense", "compressed")
HEADER = ("# Serve config emitted by `raytrain serve emit=FILE [overrides]` from conf/serve.yaml and conf/serve/:\n"
          "# change those and emit again rather than editing this file.\n")


@dataclass
class Limits:
    max_prompt_tokens: int = 1024
    max_output_tokens: int = 256
    request_timeout_s: float = 60.0  # from arrival at the ingress to the last token; then 504
    max_choices: int = 8  # prompts x n in one request
    max_documents: int = 64  # rag.documents of one request


@dataclass
class Autoscaling:  # Serve's autoscaling_config
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 8
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0


@dataclass
class Backpressure:  # Serve's backpressure_config: the answer once max_queued_requests are waiting
    status_code: int = 503
    retry_after_s: float = 1.0


@dataclass
class ActorOptions:  # Serve's ray_actor_options: resources of one replica
    num_cpus: float = 1.0
    num_gpus: float = 0.0


@dataclass
class Deployment:
    """Serve deployment options, under Serve's own names (emitted as they are)."""

    max_ongoing_requests: int = 16  # per replica; a model needs >= engine.max_batch_size to fill its KV slots
    max_queued_requests: int = 32  # per caller; beyond it requests get 503 + Retry-After, never an unbounded queue
    backpressure_config: Backpressure = field(default_factory=Backpressure)
    autoscaling_config: Autoscaling = field(default_factory=Autoscaling)
    ray_actor_options: ActorOptions = field(default_factory=ActorOptions)
    health_check_period_s: float = 10.0
    health_check_timeout_s: float = 30.0
    graceful_shutdown_timeout_s: float = 20.0


@dataclass
class StoreShards:
    """A model's document stores sharded over Ray actors (`serving/shards.py`): each actor holds the model and a part
    of every store's document KV, scores a question's query copies on its part, and sends only the kept paths' KV to
    the replica, which decodes. Needs superposition on (one round; bayesian or attention saliency)."""

    count: int = 1  # actors per store and replica; 1: the replica's own engine holds every store's KV
    num_cpus: float = 1.0  # each actor's resources
    num_gpus: float = 0.0


@dataclass
class ModelSpec:
    checkpoint: str | None = None  # as the replicas see it: absolute, relative to the cluster's working dir, or shared
    tokenizer: str | None = None  # for checkpoints that ship none
    weights: str = "dense"  # weight format, one of WEIGHT_FORMATS
    device: str = "auto"  # auto: cuda when the replica has a GPU, else cpu
    dtype: str = "auto"  # auto: bfloat16 on cuda, float32 on cpu | float32 | bfloat16 | float16
    chat_template: str | None = None  # Jinja; null: the tokenizer's own, else a plain "role: content" template
    adapters: dict[str, str] = field(default_factory=dict)  # LoRA adapters of this base: name -> dir (`NAME:name`)
    adapter_slots: int = 4  # adapters in memory at once per replica (loaded on first use, least recently used out)
    rag_instruction: str | None = None  # the user turn's words before a rag request's documents; null: rag.INSTRUCTION
    document_stores: dict[str, str] = field(default_factory=dict)  # rag: name -> a documents file (.jsonl or text, as
    # `raytrain generate rag.documents`), read by every replica; a request names one as rag.store
    warm_document_stores: bool = True  # with superposition on: compute each store's document KV into the path cache
    # as the replica starts (or each shard's, in its actor), so that the first question over a store is warm
    store_shards: StoreShards = field(default_factory=StoreShards)
    engine: EngineConfig = field(default_factory=EngineConfig)  # batching; decoding: plain, LazyLLM, SpecStream
    stream_interval_s: float = 0.02  # a stream's items are at least this far apart (text accumulates between them)
    limits: Limits = field(default_factory=Limits)
    deployment: Deployment = field(default_factory=Deployment)


@dataclass
class ApiSpec:
    """What the ingress enforces before a request reaches any model."""

    api_key: str | None = None  # clients send `Authorization: Bearer KEY`; prefer api_key_file or $RAYTRAIN_API_KEY
    api_key_file: str | None = None  # a file holding the key, as the ingress replicas see it
    max_body_bytes: int = 1048576  # a larger request body is answered 413 unread
    body_timeout_s: float = 10.0  # a body not received in full by then (a trickling client) is answered 408
    probe_interval_s: float = 1.0  # how often the ingress pings every model replica (/health, quick 503s)
    probe_timeout_s: float = 2.0  # a replica that has not answered a ping by then cannot answer


@dataclass
class HttpOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    request_timeout_s: float | None = None  # the proxy's own limit; per-model limits.request_timeout_s answer first
    keep_alive_timeout_s: float = 90.0


@dataclass
class ServeSpec:
    app_name: str = "raytrain"
    route_prefix: str = "/"
    proxy_location: str = "EveryNode"
    http_options: HttpOptions = field(default_factory=HttpOptions)
    ingress: Deployment = field(default_factory=Deployment)
    api: ApiSpec = field(default_factory=ApiSpec)
    models: dict[str, ModelSpec] = field(default_factory=dict)


def serve_spec(node: Any, key: str = "serve") -> ServeSpec:
    """A validated `ServeSpec` from a config node; errors name `key.<field>`."""
    spec = to_dataclass(ServeSpec, node, key)
    if not spec.models:
        raise ConfigError(f"{key}.models is empty: serve at least one model")
    check_deployment(spec.ingress, f"{key}.ingress")
    check_api(spec.api, f"{key}.api")
    for name, model in spec.models.items():
        check_model(name, model, f"{key}.models.{name}")
        check_replica(model, f"{key}.models.{name}")
    return spec


def model_spec(node: Any, key: str) -> ModelSpec:
    return to_dataclass(ModelSpec, node, key)


def api_spec(node: Any, key: str) -> ApiSpec:
    spec = to_dataclass(ApiSpec, node, key)
    check_api(spec, key)
    return spec


def check_api(api: ApiSpec, key: str) -> None:
    if api.api_key and api.api_key_file:
        raise ConfigError(f"{key}: set api_key or api_key_file, not both")
    for limit in ("max_body_bytes", "body_timeout_s", "probe_interval_s", "probe_timeout_s"):
        if getattr(api, limit) <= 0:
            raise ConfigError(f"{key}.{limit} must be > 0")


NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"  # model and adapter names; ':' joins them as `model` in requests


def check_model(name: str, model: ModelSpec, key: str) -> None:
    if not re.fullmatch(NAME, name):
        raise ConfigError(f"{key}: model names use letters, digits, '.', '_' and '-'")
    for adapter, path in model.adapters.items():
        if not re.fullmatch(NAME, adapter) or not path:
            raise ConfigError(f"{key}.adapters.{adapter}: adapter names use letters, digits, '.', '_' and '-', and "
                              "each names its directory")
    if model.adapters and model.engine.lazy:
        raise ConfigError(f"{key}.adapters: LoRA adapters are served with engine.lazy=false (LazyLLM runs one "
                          "sequence beside the batch, without adapters)")
    if model.adapter_slots < 1:
        raise ConfigError(f"{key}.adapter_slots={model.adapter_slots} must be >= 1")
    for store, path in model.document_stores.items():
        if not re.fullmatch(NAME, store) or not path:
            raise ConfigError(f"{key}.document_stores.{store}: store names use letters, digits, '.', '_' and '-', "
                              "and each names its documents file")
    check_store_shards(model, key)
    if not model.checkpoint:
        raise ConfigError(f"{key}.checkpoint is not set (checkpoint=PATH sets the default model's)")
    if model.weights not in WEIGHT_FORMATS:
        raise ConfigError(f"{key}.weights={model.weights!r} is unknown; known: {', '.join(WEIGHT_FORMATS)}")
    if model.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"{key}.device={model.device!r}: use auto, cpu or cuda")
    if model.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ConfigError(f"{key}.dtype={model.dtype!r}: use auto, float32, bfloat16 or float16")
    for limit in ("max_prompt_tokens", "max_output_tokens", "request_timeout_s", "max_choices", "max_documents"):
        if getattr(model.limits, limit) <= 0:
            raise ConfigError(f"{key}.limits.{limit} must be > 0")
    model.engine.superposition.check(f"{key}.engine.superposition")


def check_store_shards(model: ModelSpec, key: str) -> None:
    shards, superposition = model.store_shards, model.engine.superposition
    if shards.count < 1:
        raise ConfigError(f"{key}.store_shards.count={shards.count} must be >= 1 (1: the replica holds every store)")
    if shards.num_cpus < 0 or shards.num_gpus < 0:
        raise ConfigError(f"{key}.store_shards: num_cpus and num_gpus must be >= 0")
    if shards.count > 1 and not superposition.enabled:
        raise ConfigError(f"{key}.store_shards.count={shards.count}: shards score superposed paths; set "
                          "engine.superposition.enabled=true (naive RAG needs every document in one prompt)")
    if shards.count > 1:
        check_shardable(superposition, f"{key}.engine.superposition")


def check_replica(model: ModelSpec, key: str) -> None:
    """The model's Serve deployment options. Only the spec has them: a Serve config carries them in `deployments`,
    not in the replica's args, so the app builder checks the model alone."""
    check_deployment(model.deployment, f"{key}.deployment")
    if model.deployment.max_ongoing_requests < model.engine.max_batch_size:
        raise ConfigError(f"{key}.deployment.max_ongoing_requests={model.deployment.max_ongoing_requests} is below "
                          f"engine.max_batch_size={model.engine.max_batch_size}: its KV slots could never fill")


def check_deployment(d: Deployment, key: str) -> None:
    if d.max_queued_requests < 0:
        raise ConfigError(f"{key}.max_queued_requests={d.max_queued_requests}: must be >= 0 (an unbounded queue "
                          "hides overload; excess requests get 503 + Retry-After instead)")
    if d.max_ongoing_requests < 1:
        raise ConfigError(f"{key}.max_ongoing_requests must be >= 1")
    a = d.autoscaling_config
    if not 0 <= a.min_replicas <= a.max_replicas or a.max_replicas < 1:
        raise ConfigError(f"{key}.autoscaling_config: need 0 <= min_replicas <= max_replicas and max_replicas >= 1 "
                          f"(got {a.min_replicas}, {a.max_replicas})")


def deployment_name(model: str) -> str:
    return f"model-{model}"


def model_args(model: ModelSpec) -> dict[str, Any]:
    """What a model replica is built from: everything but the Serve deployment options."""
    return {k: v for k, v in asdict(model).items() if k != "deployment"}


def scale_to_zero(models: dict[str, ModelSpec]) -> list[str]:
    """Models whose replicas may all be gone by design (min_replicas 0): a request waits for one to start, rather
    than being answered 503 as while a failed replica is replaced."""
    return [name for name, m in models.items() if m.deployment.autoscaling_config.min_replicas == 0]


def serve_config(spec: ServeSpec) -> dict[str, Any]:
    """The Serve config (`ServeDeploySchema`) of `spec`: what `serve run`/`serve deploy` read and this repo runs."""
    deployments = [{"name": INGRESS, **asdict(spec.ingress)}]
    deployments += [{"name": deployment_name(name), **asdict(m.deployment)} for name, m in spec.models.items()]
    return {
        "proxy_location": spec.proxy_location,
        "http_options": asdict(spec.http_options),
        "applications": [{
            "name": spec.app_name,
            "route_prefix": spec.route_prefix,
            "import_path": IMPORT_PATH,
            "args": {"models": {name: model_args(m) for name, m in spec.models.items()}, "api": asdict(spec.api),
                     "scale_to_zero": scale_to_zero(spec.models)},
            "deployments": deployments,
        }],
    }


def to_yaml(config: dict[str, Any]) -> str:
    return HEADER + yaml.safe_dump(config, sort_keys=False, width=120)
