"""Model checkpoints in Hugging Face layout: `config.json`, `model.safetensors`, tokenizer files, `raytrain.json`.

`save_pretrained` writes a directory atomically (a temporary sibling renamed into place, never over an existing
checkpoint). `load_pretrained` reads raytrain checkpoints and, converted on load by `foreign.py`, the official
OpenELM layout and Hugging Face Llama checkpoints; it checks every tensor's shape against the model the config
describes, and accepts a checkpoint directory, a training checkpoint (`step*/` with `model/`) or a whole run
directory (its latest registered checkpoint).

Compressed checkpoints (`raytrain compress`) are the same layout: `config.json` gains a `raytrain_compression`
entry and `model.safetensors` holds packed arrays (`raytrain.compress.format`). Every reader here dispatches on the
file: `read_weights` rebuilds dense weights, so `load_pretrained` and everything built on it load them unchanged, and
`load_pretrained(keep_compressed=True)` swaps the compressed layers for `CompressedLinear` (the GPU kernel path).
Weight-level tools that need the stored names build Hugging Face causal LMs through `transformers`
(`load_hf_causal_lm`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from raytrain.checkpoint.foreign import FORMATS, openelm_name
from raytrain.compress import format as compressed_format
from raytrain.compress.format import CompressedTensor
from raytrain.config import RaytrainError
from raytrain.data.tokenizer import TokenizerFiles, load_tokenizer, write_files
from raytrain.models.registry import build_model, config_dict, model_config

CONFIG, WEIGHTS, META = "config.json", "model.safetensors", "raytrain.json"
ADAPTER_CONFIG = "adapter_config.json"  # a LoRA adapter's directory (`raytrain.checkpoint.adapter`)
SHARD_INDEX = "model.safetensors.index.json"
COMPRESSION = "raytrain_compression"  # config.json key of compressed checkpoints (not HF's quantization_config,
# which would send transformers looking for a quantizer of that name)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja")  # transformers 5 saves the chat template in its own file


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
    with atomic_dir(out_dir) as tmp:
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
    return Path(out_dir)


def save_compressed(out_dir: str | Path, source: str | Path, dense: dict[str, torch.Tensor],
                    compressed: dict[str, CompressedTensor], record: dict[str, Any] | None = None) -> Path:
    """Write a compressed checkpoint of `source` (any layout): its config.json with the compression summary (and
    `record`) under `raytrain_compression`, its tokenizer files and raytrain.json, and one safetensors file with
    `dense` tensors and the `compressed` ones packed."""
    record = {**compressed_format.summary(compressed), **(record or {})}
    source = resolve_checkpoint(source)
    config = _read_json(source / CONFIG)
    meta = _read_json(source / META) if (source / META).is_file() else {}
    with atomic_dir(out_dir) as tmp:
        compressed_format.save_file(tmp / WEIGHTS, dense, compressed)
        (tmp / CONFIG).write_text(json.dumps({**config, COMPRESSION: record}, indent=2) + "\n")
        (tmp / META).write_text(json.dumps({**meta, "compressed_from": str(source)}, indent=2) + "\n")
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, tmp / name)
    return Path(out_dir)


@contextlib.contextmanager
def atomic_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `out_dir` to fill; it is renamed into place only if the block succeeds."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CheckpointError(f"{out_dir} already holds files; refusing to overwrite a checkpoint")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
    latest = latest_run_checkpoint(path)
    for model_dir in (path, path / "model", latest / "model" if latest else None):
        if model_dir is not None and (model_dir / ADAPTER_CONFIG).is_file():
            base = _read_json(model_dir / ADAPTER_CONFIG).get("base", {}).get("path")
            raise CheckpointError(f"checkpoint {path} is a LoRA adapter: load its base with the adapter "
                                  f"(checkpoint={base} adapter={path})")
    if (path / "model" / CONFIG).is_file():
        return path / "model"
    if latest is not None:
        return latest / "model"
    raise CheckpointError(f"checkpoint {path}: no {CONFIG} there, no model/ subdirectory and no registered "
                          "checkpoint of a training run")


def latest_run_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint Ray Train registered for a run (only fully uploaded checkpoints are registered); its
    `model/` holds a model or, for a LoRA run, an adapter."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    if not snapshot.is_file():
        return None
    latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
    name = latest.get("checkpoint_dir_name")
    export = run_dir / name / "model" if name else None
    return run_dir / name if export and ((export / CONFIG).is_file() or (export / ADAPTER_CONFIG).is_file()) else None


def load_pretrained(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                    tokenizer: str | Path | None = None, keep_compressed: bool = False,
                    config: Any = None, adapter: str | Path | None = None) -> Pretrained:
    """Load weights (and the tokenizer, if the checkpoint has one or `tokenizer` points at one). A compressed
    checkpoint is rebuilt densely, or with `keep_compressed` its compressed linear layers become `CompressedLinear`
    (other compressed tensors, such as an 8-bit embedding, are rebuilt).
    `config` builds another model config than the checkpoint's around the same parameter shapes (e.g. a new RoPE
    base or context length for the next stage of a recipe). `adapter` puts a LoRA adapter trained on this base on
    it, unmerged (`raytrain.checkpoint.adapter`; refused on another base)."""
    path = resolve_checkpoint(path)
    saved = read_model_config(path)
    cfg = config if config is not None else saved
    state, compressed = read_tensors(path) if keep_compressed else (read_weights(path), {})
    model_type = _read_json(path / CONFIG).get("model_type")
    if model_type in FORMATS:
        if compressed and model_type != "openelm":
            raise CheckpointError(f"{path}: keep_compressed needs raytrain or OpenELM names; {model_type} weights "
                                  "are converted on load, so load it without keep_compressed")
        state = FORMATS[model_type][1](state, saved)
        compressed = {openelm_name(k): v for k, v in compressed.items()}
    model = build_model(cfg, "meta")
    for name in [k for k in compressed if not _is_linear_weight(model, k)]:  # e.g. an 8-bit embedding table
        state[name] = compressed.pop(name).dense()
    check_state(model, {**state, **{k: torch.empty(ct.shape, device="meta") for k, ct in compressed.items()}}, path)
    model.to_empty(device=device)
    if dtype is not None:
        model.to(dtype)
    model.tie_weights()
    model.load_state_dict(state, strict=False)
    model.init_buffers()
    if compressed:
        from raytrain.compress.linear import replace_linears

        replace_linears(model, compressed, device)
    if adapter is not None:
        from raytrain.checkpoint.adapter import attach, base_fingerprint, read_adapter

        attach(model, read_adapter(adapter), base_fingerprint(path), path)
    tok_dir = Path(tokenizer) if tokenizer else path
    tok = load_tokenizer(tok_dir) if tokenizer or (path / "tokenizer.json").is_file() else None
    meta = _read_json(path / META) if (path / META).is_file() else {}
    return Pretrained(model.eval(), cfg, tok, meta, path)


def _is_linear_weight(model: nn.Module, name: str) -> bool:
    module_name, _, leaf = name.rpartition(".")
    try:
        return leaf == "weight" and isinstance(model.get_submodule(module_name), nn.Linear)
    except AttributeError:
        return False


def read_model_config(path: str | Path) -> Any:
    """The model config of a checkpoint (raytrain or official OpenELM `config.json`)."""
    path = resolve_checkpoint(path)
    raw = _read_json(path / CONFIG)
    model_type = raw.get("model_type", "raytrain")
    if model_type in FORMATS:
        try:
            return FORMATS[model_type][0]({k: v for k, v in raw.items() if k != COMPRESSION})
        except KeyError as e:
            raise CheckpointError(f"{path / CONFIG}: no {e} for a {model_type} config") from None
        except (ValueError, TypeError) as e:  # converters name the offending key
            raise CheckpointError(f"{path / CONFIG}: {e}") from None
    if model_type != "raytrain":
        raise CheckpointError(f"{path / CONFIG}: model_type {model_type!r} is not supported "
                              f"(supported: raytrain, {', '.join(FORMATS)}; other Hugging Face causal LMs load "
                              "through load_hf_causal_lm)")
    fields = {k: v for k, v in raw.items() if k not in ("model_type", "architectures", "torch_dtype", COMPRESSION)}
    return model_config(fields, key=str(path / CONFIG))


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint by its stored name; compressed weights are rebuilt densely (on CPU)."""
    state, compressed = read_tensors(path)
    state.update({name: ct.dense() for name, ct in compressed.items()})
    return state


def read_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, CompressedTensor]]:
    """The dense tensors and the compressed ones (kept compressed) of a checkpoint, by stored name."""
    state: dict[str, torch.Tensor] = {}
    compressed: dict[str, CompressedTensor] = {}
    for f in weight_files(path):
        try:
            if compressed_format.is_compressed_file(f):
                dense, packed = compressed_format.load_file(f)
                state.update(dense)
                compressed.update(packed)
                continue
            with safe_open(str(f), framework="pt") as st:
                state.update({k: st.get_tensor(k) for k in st.keys()})
        except compressed_format.FormatError as e:
            raise CheckpointError(str(e)) from None
        except Exception as e:  # a truncated or foreign file
            raise CheckpointError(f"checkpoint {f}: unreadable safetensors file ({e})") from None
    return state, compressed


def is_compressed_checkpoint(path: str | Path) -> bool:
    """Whether a checkpoint holds weights written by `raytrain compress` (read from the file headers only)."""
    return any(compressed_format.is_compressed_file(f) for f in weight_files(resolve_checkpoint(path)))


def weight_files(path: str | Path) -> list[Path]:
    path = Path(path)
    if (path / WEIGHTS).is_file():
        return [path / WEIGHTS]
    if (path / SHARD_INDEX).is_file():
        return [path / f for f in sorted(set(_read_json(path / SHARD_INDEX)["weight_map"].values()))]
    raise CheckpointError(f"checkpoint {path}: no {WEIGHTS} or {SHARD_INDEX}")


@dataclass(frozen=True)
class StoredTensor:
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def stored_tensors(path: str | Path) -> dict[str, StoredTensor]:
    """Where each stored tensor lives, its shape and dtype, read from the safetensors headers only."""
    found = {}
    for f in weight_files(path):
        try:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    info = st.get_slice(k)
                    found[k] = StoredTensor(f, tuple(info.get_shape()),
                                            SAFETENSORS_DTYPES.get(info.get_dtype(), torch.float32))
        except Exception as e:
            raise CheckpointError(f"checkpoint {f}: unreadable safetensors file ({e})") from None
    return found


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


# ---- other Hugging Face causal LMs (through transformers) ------------------------------------------------------

def is_raytrain_layout(path: str | Path) -> bool:
    """True for raytrain and official OpenELM checkpoints, whose stored names are the decoder's (up to a rename);
    False for other Hugging Face causal LMs. Llama checkpoints also load through `load_pretrained`, converted (fused
    projections), but weight-level tools (compression) work on stored tensors, so they build them through
    transformers (`load_hf_causal_lm`), whose parameter names are the stored names."""
    return _read_json(resolve_checkpoint(path) / CONFIG).get("model_type") in (None, "raytrain", "openelm")


def linear_weight_names(path: str | Path) -> list[str]:
    """Stored names of the weights of the linear layers inside the blocks (the output head and embeddings are
    not among them), found by building the checkpoint's model on the meta device."""
    return _weight_names(path, lambda m, output: isinstance(m, nn.Linear) and m is not output)


def embedding_weight_names(path: str | Path) -> list[str]:
    """Stored names of the token embedding tables (with tied embeddings, also the output head's weights)."""
    return _weight_names(path, lambda m, output: isinstance(m, nn.Embedding))


def _weight_names(path: str | Path, select: Callable[[nn.Module, nn.Module], bool]) -> list[str]:
    path = resolve_checkpoint(path)
    if is_raytrain_layout(path):
        model = build_model(read_model_config(path), "meta")
        output = model.head
    else:
        model = _hf_model(path, "meta")
        output = model.get_output_embeddings()
    to_model = parameter_names(path)
    chosen = {f"{name}.weight" for name, m in model.named_modules() if select(m, output)}
    return [name for name, t in stored_tensors(path).items() if to_model(name) in chosen and len(t.shape) == 2]


def parameter_names(path: str | Path) -> Callable[[str], str]:
    """Stored tensor name -> the parameter name in the model `load_pretrained` / `load_hf_causal_lm` builds."""
    return openelm_name if _read_json(resolve_checkpoint(path) / CONFIG).get("model_type") == "openelm" else str


def load_hf_causal_lm(path: str | Path, device: torch.device | str = "cpu") -> Any:
    """A transformers causal LM from a checkpoint directory (compressed weights rebuilt densely)."""
    path = resolve_checkpoint(path)
    model = _hf_model(path, device)  # built for real: its non-persistent buffers (RoPE) are computed in __init__
    state = read_weights(path)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = sorted(k for k in state if k not in expected or tuple(state[k].shape) != expected[k])
    missing = sorted(set(expected) - set(state) - set(getattr(model, "_tied_weights_keys", None) or ()))
    if wrong or missing:
        raise CheckpointError(f"checkpoint {path} does not match its config: unexpected or misshapen "
                              f"{wrong[:3]}, missing {missing[:3]}")
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model.eval()


def _hf_model(path: Path, device: str) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = {k: v for k, v in _read_json(path / CONFIG).items() if k != COMPRESSION}
    try:
        config = AutoConfig.for_model(**raw)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path / CONFIG}: not a model transformers knows ({e})") from None
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config)
