"""`raytrain compress method=seedlm|rtn|palettize bits=... checkpoint=PATH out=PATH [eval=true]`: compress every
linear weight of a checkpoint on Ray and print a JSON summary (`method=palettize bits=mixed target_bpw=3.5`: AFM's
2/4-bit mix); `matrix=gaussian rows=R cols=C seed=S` compresses one standard-normal matrix instead (no Ray), the
case the spec's reference figures describe."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import torch
from omegaconf import DictConfig

from raytrain.compress.format import METHODS, compress_tensor, relative_error
from raytrain.compress.lfsr import cycle
from raytrain.compress.palettize import PalettizeConfig
from raytrain.compress.rtn import RTNConfig
from raytrain.compress.seedlm import PRESETS, SeedLMConfig
from raytrain.config import ConfigError, plain, to_dataclass

CONFIG_NAME = "compress"
HELP = "compress a checkpoint's linear layers into SeedLM seeds, RTN codes or palettes on Ray (JSON summary)"
log = logging.getLogger("raytrain.compress")
MIXED = "mixed"


def codec_configs(cfg: DictConfig) -> dict[str, Any]:
    """The configs of the codecs that exist at `bits`, validated (errors name the key): SeedLM at 4 or 3 bits,
    RTN and palettization at any integer width; `bits=mixed` is palettization's, at the widest of its mix."""
    if cfg.bits == MIXED:
        widest = max(plain(cfg.palettize.mixed_bits), default=0)
        return {"palettize": _palettize(cfg, widest)}
    if not isinstance(cfg.bits, int):
        raise ConfigError(f"bits={cfg.bits!r}: an integer width, or {MIXED} (method=palettize)")
    configs = {"palettize": _palettize(cfg, cfg.bits)}
    rtn = plain(cfg.rtn)
    configs["rtn"] = to_dataclass(RTNConfig, {"bits": rtn["code_bits"] or cfg.bits, "group_size": rtn["group_size"]},
                                  "rtn")
    if cfg.bits in PRESETS:
        seed = plain(cfg.seedlm)
        C, P = PRESETS[cfg.bits]
        seed["C"], seed["P"] = seed["C"] or C, seed["P"] or P
        configs["seedlm"] = to_dataclass(SeedLMConfig, seed, "seedlm")
        try:
            cycle(configs["seedlm"].lfsr)
        except ValueError as e:
            raise ConfigError(f"seedlm.taps: {e}") from None
    return configs


def _palettize(cfg: DictConfig, bits: int) -> PalettizeConfig:
    node = {"bits": bits, "group_size": cfg.palettize.group_size, "iterations": cfg.palettize.iterations}
    return to_dataclass(PalettizeConfig, node, "palettize")


def padding_note(cfg: DictConfig, bits_per_weight: float) -> dict[str, str]:
    """Beside "bits": 3, say so when SeedLM's padding stores more than the nominal bits per weight."""
    if cfg.method != "seedlm" or bits_per_weight < cfg.bits + 0.005:
        return {}
    if cfg.seedlm.blocking == "flat":
        why = "each tensor's tail is padded to a whole block"
    else:
        why = ("every row is padded to whole blocks (seedlm.blocking=flat pads only each tensor's tail, as the paper "
               "does)")
    return {"bits_note": f"{cfg.bits}-bit SeedLM stores {bits_per_weight:.3f} bits per weight here: {why}"}


def run(cfg: DictConfig) -> dict[str, Any]:
    """Prints the summary as one JSON object and returns it."""
    if cfg.method not in METHODS:
        raise ConfigError(f"method={cfg.method!r} is unknown; known: {', '.join(sorted(METHODS))}")
    if cfg.bits == MIXED and cfg.method != "palettize":
        raise ConfigError(f"bits={MIXED} is a palettization setting; use method=palettize")
    configs = codec_configs(cfg)
    if cfg.method not in configs:
        widths = "3 or 4" if cfg.method == "seedlm" else "an integer width"
        raise ConfigError(f"bits={cfg.bits}: method={cfg.method} has no setting at these bits; use {widths}")
    device = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else cfg.device.replace("auto", "cpu")
    summary = gaussian(cfg, configs, device) if cfg.matrix is not None else checkpoint(cfg, configs, device)
    print(json.dumps(summary))
    return summary


def gaussian(cfg: DictConfig, configs: dict[str, Any], device: str) -> dict[str, Any]:
    if cfg.bits == MIXED:
        raise ConfigError(f"bits={MIXED} allocates widths across a checkpoint's tensors; matrix=gaussian is one")
    if cfg.matrix != "gaussian":
        raise ConfigError(f"matrix={cfg.matrix!r}: the only synthetic matrix is 'gaussian'")
    if cfg.rows < 1 or cfg.cols < 1:
        raise ConfigError(f"rows={cfg.rows}, cols={cfg.cols}: both must be positive")
    weight = torch.randn(cfg.rows, cfg.cols, generator=torch.Generator().manual_seed(cfg.seed))
    config = configs[cfg.method]
    started = time.time()
    try:
        ct = compress_tensor(weight, cfg.method, config, device)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    seconds = time.time() - started
    summary = {"matrix": "gaussian", "rows": cfg.rows, "cols": cfg.cols, "seed": cfg.seed, "method": cfg.method,
               "bits": cfg.bits, "bits_per_weight": ct.bits_per_weight, **padding_note(cfg, ct.bits_per_weight),
               "config": config.meta(), "device": device,
               "mean_relative_error": relative_error(weight, ct.dense()), "seconds": round(seconds, 3)}
    if cfg.method == "seedlm":
        summary["blocks_per_second"] = round(ct.arrays["seeds"].numel() / seconds, 1)
    for baseline in cfg.evaluation.baselines:
        if baseline != cfg.method and baseline in configs:
            other = compress_tensor(weight, baseline, configs[baseline], device)
            summary[baseline] = {"config": configs[baseline].meta(), "bits_per_weight": other.bits_per_weight,
                                 "mean_relative_error": relative_error(weight, other.dense())}
    return summary


def checkpoint(cfg: DictConfig, configs: dict[str, Any], device: str) -> dict[str, Any]:
    import ray

    from raytrain.pipelines.compress import EvalConfig, JobConfig, evaluate, heldout_windows, plan_job, run_job

    if cfg.checkpoint is None or cfg.out is None:
        raise ConfigError("checkpoint=PATH and out=PATH are required (or matrix=gaussian)")
    evaluation = to_dataclass(EvalConfig, cfg.evaluation, "evaluation")
    unknown = [b for b in evaluation.baselines if b not in METHODS]
    if unknown:
        raise ConfigError(f"evaluation.baselines: unknown method {unknown[0]!r}; known: {', '.join(sorted(METHODS))}")
    absent = [b for b in evaluation.baselines if b != cfg.method and b not in configs]
    if absent and cfg.eval:
        raise ConfigError(f"evaluation.baselines: {absent[0]} has no setting at bits={cfg.bits}; drop it "
                          "(evaluation.baselines=[]) or compress it in its own run")
    embedding, mixed = palettize_options(cfg)
    plan = plan_job(cfg.checkpoint, cfg.out, cfg.method, configs[cfg.method], to_dataclass(JobConfig, cfg.job, "job"),
                    embedding, mixed)
    windows = heldout_windows(plan.source, evaluation) if cfg.eval else None  # fail before compressing
    if not ray.is_initialized():
        local = not (cfg.ray.address or os.environ.get("RAY_ADDRESS"))
        ray.init(address=cfg.ray.address, num_cpus=cfg.ray.num_cpus if local else None, include_dashboard=False)
    job = run_job(plan, {"bits": cfg.bits})
    summary = {"method": cfg.method, "bits": cfg.bits, "bits_per_weight": job["bits_per_weight"],
               **padding_note(cfg, job["bits_per_weight"]), "config": configs[cfg.method].meta(), **job}
    if cfg.eval:
        report = evaluate(plan.source, plan.out, cfg.method, configs, evaluation, windows, device)
        summary["perplexity"] = report["results"][cfg.method]["perplexity"]
        summary["eval"] = report
    return summary


def palettize_options(cfg: DictConfig) -> tuple[Any, Any]:
    """For method=palettize: the embedding's encoding (8-bit integers, one scale per row; None leaves it as is)
    and the mix (bits=mixed); (None, None) for other methods."""
    from raytrain.pipelines.compress import Encoding, MixedConfig

    if cfg.method != "palettize":
        return None, None
    bits = cfg.palettize.embedding_bits
    embedding = Encoding("rtn", to_dataclass(RTNConfig, {"bits": bits, "group_size": 1}, "palettize.embedding_bits")) \
        if bits is not None else None
    mixed = None
    if cfg.bits == MIXED:
        node = {"target_bpw": cfg.target_bpw, "bits": plain(cfg.palettize.mixed_bits),
                **{k: cfg.palettize[k] for k in ("importance", "calibration", "calibration_tokens", "seq_len",
                                                 "batch_size")}}
        mixed = to_dataclass(MixedConfig, node, "palettize")
    return embedding, mixed
