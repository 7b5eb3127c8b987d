"""`raytrain serve checkpoint=PATH [overrides]`: OpenAI-compatible endpoints for raytrain models on Ray Serve, until
Ctrl-C. `emit=FILE` writes the Serve config instead (for `serve run FILE` / `serve deploy FILE`); serving runs that
same config, so what the YAML says is what runs."""

from __future__ import annotations

import logging
import math
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any, NoReturn

from omegaconf import DictConfig

from raytrain.checkpoint.adapter import AdapterError
from raytrain.checkpoint.hf import CheckpointError, resolve_checkpoint
from raytrain.config import ConfigError
from raytrain.infer.adapters import adapter_bank
from serving.config import ServeSpec, serve_config, serve_spec, to_yaml

CONFIG_NAME = "serve"
HELP = "serve models over an OpenAI-compatible API on Ray Serve (emit=FILE writes the Serve config)"
log = logging.getLogger("raytrain")


def run(cfg: DictConfig) -> None:
    spec = serve_spec(cfg.serve)
    config = serve_config(spec)
    if cfg.emit:
        write_atomic(Path(cfg.emit), to_yaml(config))
        log.info("wrote %s: `serve run %s` or `serve deploy %s`", cfg.emit, cfg.emit, cfg.emit)
        return
    check_checkpoints(spec)
    import ray
    from ray import serve

    from serving.run import start

    if not ray.is_initialized():
        ray.init(address=cfg.ray.address, num_cpus=_local_cpus(cfg, spec), include_dashboard=cfg.ray.dashboard)
    signal.signal(signal.SIGTERM, _interrupt)  # a plain kill also shuts Serve down cleanly
    try:
        url = start(config)
        log.info("serving %s at %s/v1 (Ctrl-C stops)", ", ".join(spec.models), url)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log.info("shutting down")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the shutdown short
            signal.signal(sig, signal.SIG_IGN)
        serve.shutdown()


def check_checkpoints(spec: ServeSpec) -> None:
    """Each model's checkpoint and tokenizer exist and its adapters fit it, before any replica tries to load them."""
    for name, model in spec.models.items():
        try:
            path = resolve_checkpoint(model.checkpoint)
        except CheckpointError as e:
            raise ConfigError(f"serve.models.{name}.checkpoint: {e}") from None
        if not model.tokenizer and not (path / "tokenizer.json").is_file():
            raise ConfigError(f"serve.models.{name}: {path} ships no tokenizer; set tokenizer=DIR")
        if model.adapters:
            try:
                adapter_bank(path, model.adapters, f"serve.models.{name}.adapters")
            except AdapterError as e:
                raise ConfigError(str(e)) from None


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _local_cpus(cfg: DictConfig, spec: ServeSpec) -> int | None:
    """CPUs of a cluster started here: at least what every deployment asks for at its maximum replica count."""
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        return None
    deployments: list[Any] = [spec.ingress, *(m.deployment for m in spec.models.values())]
    needed = sum(d.autoscaling_config.max_replicas * d.ray_actor_options.num_cpus for d in deployments)
    return cfg.ray.num_cpus or max(os.cpu_count() or 1, math.ceil(needed))


def _interrupt(*_: object) -> NoReturn:
    raise KeyboardInterrupt
