"""Where a model replica (or a document-store shard beside it) puts its weights: `device: auto` is the GPU when the
actor was given one, and `dtype: auto` is bfloat16 there, the model's own float32 on the CPU."""

from __future__ import annotations

import torch

from serving.config import ModelSpec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_device(spec: ModelSpec) -> tuple[str, torch.dtype | None]:
    """The device and dtype of the model's weights in this process (dtype None: the model's default, float32)."""
    device = spec.device if spec.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if spec.dtype == "auto":
        return device, torch.bfloat16 if device == "cuda" else None
    return device, DTYPES[spec.dtype]
