"""Compressed tensors and the safetensors file that holds them beside the uncompressed ones.

A compressed [out, in] weight `NAME` is stored as arrays `NAME.<field>` (SeedLM: `seeds`, `exponents`,
`coefficients`; RTN: `codes`, `scales`; palettization: `indices`, `lut`), and the file's header metadata key
`raytrain.compression` records, per tensor, the method, its config (C, P, K, taps, exponent rule, rounding, seed
convention, blocking...), the dense shape and dtype and the padding (zeros stored beyond the weights). `load_file`
checks every array against that record, so a truncated, hand-edited or mismatched file fails with the tensor named
instead of decoding garbage. `dense_state` is the reconstructing loader; `load_file` keeps tensors compressed (for
the GPU kernel).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file as _save_safetensors

from raytrain.compress import palettize, rtn, seedlm
from raytrain.config import RaytrainError

COMPRESSION_KEY = "raytrain.compression"
FORMAT_VERSION = 1


class FormatError(RaytrainError):
    pass


@dataclass(frozen=True)
class Method:
    """A codec: its config class and the module with encode / decode / pack / unpack / expected_sizes / padding /
    row_alignment."""

    config_cls: type
    codec: ModuleType


METHODS: dict[str, Method] = {"seedlm": Method(seedlm.SeedLMConfig, seedlm), "rtn": Method(rtn.RTNConfig, rtn),
                              "palettize": Method(palettize.PalettizeConfig, palettize)}


@dataclass
class CompressedTensor:
    """One compressed weight: stored `arrays` plus what is needed to decode them."""

    method: str
    shape: tuple[int, int]
    dtype: torch.dtype
    config: Any
    arrays: dict[str, torch.Tensor]

    @classmethod
    def from_codes(cls, method: str, config: Any, codes: dict[str, torch.Tensor], shape: tuple[int, int],
                   dtype: torch.dtype) -> CompressedTensor:
        return cls(method, tuple(shape), dtype, config, METHODS[method].codec.pack(codes, config))

    @property
    def codec(self) -> ModuleType:
        return METHODS[self.method].codec

    def to(self, device: torch.device | str) -> CompressedTensor:
        arrays = {k: v.to(device) for k, v in self.arrays.items()}
        return CompressedTensor(self.method, self.shape, self.dtype, self.config, arrays)

    def codes(self) -> dict[str, torch.Tensor]:
        return self.codec.unpack(self.arrays, self.config, self.shape)

    def dense(self) -> torch.Tensor:
        return self.codec.decode(self.codes(), self.config, self.shape[1]).to(self.dtype)

    @property
    def stored_bytes(self) -> int:
        return sum(a.numel() * a.element_size() for a in self.arrays.values())

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.stored_bytes / (self.shape[0] * self.shape[1])

    def meta(self) -> dict[str, Any]:
        return {"method": self.method, "shape": list(self.shape), "dtype": str(self.dtype).removeprefix("torch."),
                "padding": self.codec.padding(self.shape, self.config), "config": self.config.meta()}


def compress_tensor(weight: torch.Tensor, method: str, config: Any,
                    device: str | torch.device = "cpu") -> CompressedTensor:
    if weight.ndim != 2:
        raise FormatError(f"only 2-D weights are compressed; got shape {tuple(weight.shape)}")
    codes = METHODS[method].codec.encode(weight, config, device)
    return CompressedTensor.from_codes(method, config, codes, tuple(weight.shape), weight.dtype)


def summary(compressed: dict[str, CompressedTensor]) -> dict[str, Any]:
    """What a compressed checkpoint records in its config.json: method(s), configs, tensor count, bits per weight."""
    methods = sorted({ct.method for ct in compressed.values()})
    configs = [ct.config.meta() for ct in compressed.values()]
    weights = sum(ct.shape[0] * ct.shape[1] for ct in compressed.values())
    return {"format_version": FORMAT_VERSION, "method": "+".join(methods),
            "config": configs[0] if all(c == configs[0] for c in configs) else None,
            "tensors": len(compressed), "bits_per_weight": 8 * sum(ct.stored_bytes for ct in compressed.values())
            / max(weights, 1)}


def relative_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    """||W - W_hat||_F / ||W||_F in float64."""
    w = weight.double()
    return float((w - approx.double()).norm() / w.norm().clamp_min(1e-300))


# ---- files -----------------------------------------------------------------------------------------------------

def save_file(path: str | Path, dense: dict[str, torch.Tensor], compressed: dict[str, CompressedTensor],
              extra_meta: dict[str, str] | None = None) -> None:
    """One safetensors file with the dense tensors, the compressed arrays and their record in the header."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in dense.items()}
    for name, ct in compressed.items():
        for field, array in ct.arrays.items():
            tensors[f"{name}.{field}"] = array.contiguous().cpu()
    record = {"format_version": FORMAT_VERSION, "tensors": {name: ct.meta() for name, ct in compressed.items()}}
    _save_safetensors(tensors, str(path), metadata={"format": "pt", COMPRESSION_KEY: json.dumps(record),
                                                    **(extra_meta or {})})


def is_compressed_file(path: str | Path) -> bool:
    return COMPRESSION_KEY in (_header(path) or {})


def load_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, CompressedTensor]]:
    """Dense tensors and compressed tensors (kept compressed) of a file written by `save_file`; every compressed
    tensor's arrays are checked against its recorded method, config and shape."""
    path = Path(path)
    record = _record(path)
    with _open(path) as st:
        tensors = {k: st.get_tensor(k) for k in st.keys()}
    compressed = {}
    for name, meta in record["tensors"].items():
        compressed[name] = _compressed_from(path, name, meta, tensors)
    return tensors, compressed


def dense_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a compressed file, the compressed ones reconstructed densely (CPU)."""
    dense, compressed = load_file(path)
    dense.update({name: ct.dense() for name, ct in compressed.items()})
    return dense


def _compressed_from(path: Path, name: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor]
                     ) -> CompressedTensor:
    where = f"{path}: compressed tensor {name}"
    try:
        method = METHODS[meta["method"]]
        config = method.config_cls.from_meta(meta["config"])
        shape = tuple(int(s) for s in meta["shape"])
        dtype = getattr(torch, meta["dtype"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise FormatError(f"{where}: unreadable record {meta} ({e!r})") from None
    if len(shape) != 2 or min(shape) < 1:
        raise FormatError(f"{where}: recorded shape {list(shape)} is not a 2-D weight")
    arrays = {}
    for field, size in method.codec.expected_sizes(shape, config).items():
        array = tensors.pop(f"{name}.{field}", None)
        if array is None:
            raise FormatError(f"{where}: array {name}.{field} is missing")
        if array.numel() != size:
            raise FormatError(f"{where}: {name}.{field} holds {array.numel()} values, its record (shape "
                              f"{list(shape)}, {meta['config']}) needs {size}")
        arrays[field] = array
    try:
        method.codec.check_arrays(arrays, config)
    except ValueError as e:
        raise FormatError(f"{where}: {e}") from None
    return CompressedTensor(meta["method"], shape, dtype, config, arrays)


def _record(path: Path) -> dict[str, Any]:
    header = _header(path)
    if header is None or COMPRESSION_KEY not in header:
        raise FormatError(f"{path}: not a compressed checkpoint file (no {COMPRESSION_KEY} metadata)")
    try:
        record = json.loads(header[COMPRESSION_KEY])
        version, tensors = record["format_version"], record["tensors"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise FormatError(f"{path}: unreadable {COMPRESSION_KEY} metadata ({e})") from None
    if version != FORMAT_VERSION:
        raise FormatError(f"{path}: compression format version {version}; this raytrain reads {FORMAT_VERSION}")
    return {"tensors": tensors}


def _header(path: str | Path) -> dict[str, str] | None:
    with _open(Path(path)) as st:
        return st.metadata()


def _open(path: Path) -> Any:
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # a truncated or foreign file
        raise FormatError(f"{path}: unreadable safetensors file ({e})") from None
