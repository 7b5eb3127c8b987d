"""Model checkpoints in Hugging Face layout: `config.json`, `model.safetensors`, tokenizer files, `raytrain.json`.

`save_pretrained` writes a directory atomically (a temporary sibling renamed into place, never over an existing
checkpoint). `load_pretrained` reads raytrain checkpoints and, converted on load by `foreign.py`, the official
OpenELM layout and Hugging Face Llama checkpoints; it checks every tensor's shape against the model the config
describes, and accepts a checkpoint directory, a training checkpoint (`step*/` with `model/`) or a whole run
directory (its latest registered checkpoint).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from raytrain.checkpoint.foreign import FORMATS
from raytrain.config import RaytrainError
from raytrain.data.tokenizer import TokenizerFiles, load_tokenizer, write_files
from raytrain.models.registry import build_model, config_dict, model_config

CONFIG, WEIGHTS, META = "config.json", "model.safetensors", "raytrain.json"
SHARD_INDEX = "model.safetensors.index.json"


class CheckpointError(RaytrainError):
    pass


@dataclass
class Pretrained:
    model: torch.nn.Module
    config: Any
    tokenizer: Any  # a transformers fast tokenizer, or None where the checkpoint ships none
    meta: dict[str, Any]
    path: Path


# ---- writing ---------------------------------------------------------------------------------------------------

def save_pretrained(out_dir: str | Path, model_cfg: Any, state: dict[str, torch.Tensor],
                    tokenizer_files: TokenizerFiles | None = None, meta: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint directory; refuses to replace an existing non-empty one."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CheckpointError(f"{out_dir} already holds files; refusing to overwrite a checkpoint")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
        dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
        architecture = "Raytrain" + type(model_cfg).__name__.removesuffix("Config")
        config = {"model_type": "raytrain", "architectures": [architecture], "torch_dtype": dtype,
                  **config_dict(model_cfg)}
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / META).write_text(json.dumps(meta or {}, indent=2) + "\n")
        if tokenizer_files:
            write_files(tokenizer_files, tmp)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers (BatchNorm statistics) by name, each tied tensor once (safetensors stores
    no aliases)."""
    persistent = model.state_dict(keep_vars=True)
    return {**dict(model.named_parameters()), **{k: b for k, b in model.named_buffers() if k in persistent}}


# ---- reading ---------------------------------------------------------------------------------------------------

def resolve_checkpoint(path: str | Path) -> Path:
    """A directory holding `config.json`: the path itself, its `model/`, or a run's latest checkpoint."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path}: no such directory")
    if (path / CONFIG).is_file():
        return path
    if (path / "model" / CONFIG).is_file():
        return path / "model"
    latest = latest_run_checkpoint(path)
    if latest is not None:
        return latest / "model"
    raise CheckpointError(f"checkpoint {path}: no {CONFIG} there, no model/ subdirectory and no registered "
                          "checkpoint of a training run")


def latest_run_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint Ray Train registered for a run (only fully uploaded checkpoints are registered)."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    if not snapshot.is_file():
        return None
    latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
    name = latest.get("checkpoint_dir_name")
    return run_dir / name if name and (run_dir / name / "model" / CONFIG).is_file() else None


def load_pretrained(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                    tokenizer: str | Path | None = None) -> Pretrained:
    """Load weights (and the tokenizer, if the checkpoint has one or `tokenizer` points at one)."""
    path = resolve_checkpoint(path)
    cfg = read_model_config(path)
    state = read_weights(path)
    model_type = _read_json(path / CONFIG).get("model_type")
    if model_type in FORMATS:
        state = FORMATS[model_type][1](state, cfg)
    model = build_model(cfg, "meta")
    check_state(model, state, path)
    model.to_empty(device=device)
    if dtype is not None:
        model.to(dtype)
    model.tie_weights()
    model.load_state_dict(state, strict=False)
    model.init_buffers()
    tok_dir = Path(tokenizer) if tokenizer else path
    tok = load_tokenizer(tok_dir) if tokenizer or (path / "tokenizer.json").is_file() else None
    meta = _read_json(path / META) if (path / META).is_file() else {}
    return Pretrained(model.eval(), cfg, tok, meta, path)


def read_model_config(path: str | Path) -> Any:
    """The model config of a checkpoint (raytrain or official OpenELM `config.json`)."""
    path = resolve_checkpoint(path)
    raw = _read_json(path / CONFIG)
    model_type = raw.get("model_type", "raytrain")
    if model_type in FORMATS:
        try:
            return FORMATS[model_type][0](raw)
        except KeyError as e:
            raise CheckpointError(f"{path / CONFIG}: no {e} for a {model_type} config") from None
    if model_type != "raytrain":
        raise CheckpointError(f"{path / CONFIG}: model_type {model_type!r} is not supported "
                              f"(supported: raytrain, {', '.join(FORMATS)})")
    fields = {k: v for k, v in raw.items() if k not in ("model_type", "architectures", "torch_dtype")}
    return model_config(fields, key=str(path / CONFIG))


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    if (path / WEIGHTS).is_file():
        files = [path / WEIGHTS]
    elif (path / SHARD_INDEX).is_file():
        files = [path / f for f in sorted(set(_read_json(path / SHARD_INDEX)["weight_map"].values()))]
    else:
        raise CheckpointError(f"checkpoint {path}: no {WEIGHTS} or {SHARD_INDEX}")
    state = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                state.update({k: st.get_tensor(k) for k in st.keys()})
        except Exception as e:  # a truncated or foreign file
            raise CheckpointError(f"checkpoint {f}: unreadable safetensors file ({e})") from None
    return state


def check_state(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Every parameter present with the model's shape, and nothing else; the error names the first mismatch."""
    expected = {k: tuple(v.shape) for k, v in model_state(model).items()}
    if getattr(getattr(model, "cfg", None), "tie_embeddings", False):
        state.pop("head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not match its config: "
                              f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise CheckpointError(f"checkpoint {path} does not match the model: {name} is "
                                  f"{tuple(state[name].shape)} in the checkpoint, {shape} in the model")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable JSON ({e})") from None
