"""Model families by name: turns a model config mapping (a `conf/model/*.yaml` preset or a checkpoint's
`config.json`) into a typed config and a module. Families: `decoder` (OpenELM, AFM), `vit` (CatLIP's image
encoder), `clip` (ViT image tower + decoder text tower) and `vlm` (ViT -> projector -> decoder, with Victor's
registers)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from raytrain.config import ConfigError, plain, to_dataclass
from raytrain.models.clip import ClipConfig, build_clip
from raytrain.models.decoder import DecoderConfig, build_decoder
from raytrain.models.pillars import PillarNetConfig, build_pillarnet
from raytrain.models.vit import ViTConfig, build_vit
from raytrain.models.vlm import VLMConfig, build_vlm


@dataclass(frozen=True)
class Family:
    config_cls: type
    build: Callable[[Any, Any], nn.Module]


FAMILIES: dict[str, Family] = {"decoder": Family(DecoderConfig, build_decoder), "vit": Family(ViTConfig, build_vit),
                               "clip": Family(ClipConfig, build_clip),
                               "pillarnet": Family(PillarNetConfig, build_pillarnet),
                               "vlm": Family(VLMConfig, build_vlm)}


def model_config(node: Mapping[str, Any], key: str = "model") -> Any:
    """`node` carries `family` (default "decoder") plus that family's config fields (interpolations resolved
    against the whole config, e.g. job=vlm's `${vlm.registers}`)."""
    fields = dict(plain(node))
    family = fields.pop("family", "decoder")
    if family not in FAMILIES:
        raise ConfigError(f"{key}.family={family!r} is unknown; known: {', '.join(sorted(FAMILIES))}")
    return to_dataclass(FAMILIES[family].config_cls, fields, key)


def family_of(cfg: Any) -> str:
    return next(name for name, fam in FAMILIES.items() if isinstance(cfg, fam.config_cls))


def config_dict(cfg: Any) -> dict[str, Any]:
    """The mapping `model_config` accepts back (what `config.json` stores)."""
    return {"family": family_of(cfg), **asdict(cfg)}


def build_model(cfg: Any, device: torch.device | str | None = None) -> nn.Module:
    return FAMILIES[family_of(cfg)].build(cfg, device)


def shape_mismatch(a: Any, b: Any) -> str | None:
    """None when models `a` and `b` have the same parameters with the same shapes (so weights of one load into
    the other, whatever their RoPE base or context length); else the first difference, in words."""
    shapes = [{k: tuple(v.shape) for k, v in build_model(cfg, "meta").named_parameters()} for cfg in (a, b)]
    for name in sorted(set(shapes[0]) | set(shapes[1])):
        if shapes[0].get(name) != shapes[1].get(name):
            return f"{name} is {shapes[0].get(name)} in {a.name}, {shapes[1].get(name)} in {b.name}"
    return None
