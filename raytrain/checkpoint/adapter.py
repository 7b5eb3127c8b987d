"""LoRA adapter checkpoints: a directory with `adapter.safetensors` and `adapter_config.json`, and nothing of the base.

The config records the LoRA settings and the base it was trained on: its path and its fingerprint, the SHA-256 of
the base checkpoint's weight files. An adapter is a correction to particular weights (an accuracy-recovery adapter
undoes the error of one palettization), so `attach` refuses it on a base with another fingerprint, naming both.
Adapters are written atomically, like every checkpoint (`hf.save_pretrained`).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from raytrain.checkpoint.hf import (ADAPTER_CONFIG, CheckpointError, atomic_dir, latest_run_checkpoint,
                                    resolve_checkpoint, weight_files)
from raytrain.config import to_dataclass
from raytrain.models.lora import LoRAConfig, apply_lora, load_adapter_state

ADAPTER_WEIGHTS = "adapter.safetensors"


class AdapterError(CheckpointError):
    pass


@dataclass
class Adapter:
    lora: LoRAConfig
    state: dict[str, torch.Tensor]
    base_fingerprint: str
    base_path: str
    path: Path
    meta: dict[str, Any]


def base_fingerprint(path: str | Path) -> str:
    """SHA-256 of a checkpoint's weight files (the same bytes anywhere they are copied), as hex."""
    files = weight_files(resolve_checkpoint(path))
    return _fingerprint(tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))


@functools.lru_cache(maxsize=16)
def _fingerprint(files: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for name, _, _ in files:
        with open(name, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def save_adapter(out_dir: str | Path, state: dict[str, torch.Tensor], lora: LoRAConfig, base_path: str | Path,
                 fingerprint: str, meta: dict[str, Any] | None = None) -> Path:
    """Write an adapter (`lora.adapter_state`) and what it was trained on; refuses an existing non-empty
    directory."""
    with atomic_dir(out_dir) as tmp:
        save_file(state, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        config = {"lora": asdict(lora), "base": {"path": str(base_path), "fingerprint": fingerprint},
                  "meta": meta or {}}
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return Path(out_dir)


def resolve_adapter(path: str | Path) -> Path:
    """An adapter directory: the path itself, its `model/`, or a training run's latest checkpoint's `model/`."""
    path = Path(path)
    if not path.exists():
        raise AdapterError(f"adapter {path}: no such directory")
    latest = latest_run_checkpoint(path)
    for candidate in (path, path / "model", latest / "model" if latest else None):
        if candidate is not None and (candidate / ADAPTER_CONFIG).is_file():
            return candidate
    raise AdapterError(f"adapter {path}: no {ADAPTER_CONFIG} there, in model/ or in a training run's latest "
                       "checkpoint")


def read_adapter(path: str | Path) -> Adapter:
    directory = resolve_adapter(path)
    try:
        raw = json.loads((directory / ADAPTER_CONFIG).read_text())
        lora = to_dataclass(LoRAConfig, raw["lora"], f"{directory / ADAPTER_CONFIG}: lora")
        base = raw["base"]
        state = load_file(str(directory / ADAPTER_WEIGHTS))
        return Adapter(lora, state, base["fingerprint"], base["path"], directory, raw.get("meta", {}))
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise AdapterError(f"adapter {directory}: unreadable ({e!r})") from None
    except Exception as e:  # a truncated safetensors file
        raise AdapterError(f"adapter {directory}: unreadable {ADAPTER_WEIGHTS} ({e})") from None


def check_base(adapter: Adapter, fingerprint: str, base_path: str | Path) -> None:
    """Refuse an adapter trained on other base weights than those at `base_path` (fingerprint `fingerprint`)."""
    if adapter.base_fingerprint != fingerprint:
        raise AdapterError(f"adapter {adapter.path} was trained on base {adapter.base_path} (fingerprint "
                           f"{adapter.base_fingerprint[:16]}), not on {base_path} (fingerprint {fingerprint[:16]}): "
                           "an adapter only fits the weights it was trained on")


def attach(model: nn.Module, adapter: Adapter, fingerprint: str, base_path: str | Path) -> None:
    """Put `adapter` on `model` (the base at `base_path`) as LoRA slot 0, after checking the base."""
    check_base(adapter, fingerprint, base_path)
    apply_lora(model, adapter.lora)
    try:
        load_adapter_state(model, adapter.state, adapter.lora.scale)
    except ValueError as e:
        raise AdapterError(f"adapter {adapter.path}: {e}") from None
