"""Typed configs from Hydra nodes, and the error type the CLI turns into a one-line message.

Library code takes dataclasses; the driver converts each composed config group with `to_dataclass`, which checks
key names and value types against the dataclass and names the offending key when one is wrong.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class RaytrainError(Exception):
    """An error caused by the user's input (config, files, checkpoint); reported in one line, no traceback."""


class ConfigError(RaytrainError):
    pass


def to_dataclass(cls: type[T], node: Mapping[str, Any] | DictConfig, key: str) -> T:
    """Validate `node` against dataclass `cls` and build it; errors name `key.<field>`."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls), plain(node))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        full_key = getattr(e, "full_key", None) or ""
        if full_key.startswith(f"{key}."):  # a node of the composed config already carries its full path
            full_key = full_key.removeprefix(f"{key}.")
        where = f"{key}.{full_key}" if full_key else key
        raise ConfigError(f"{where}: {getattr(e, 'msg', str(e)).splitlines()[0]}") from None
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{key}: {e}") from None


def plain(node: Any) -> Any:
    """A resolved plain-Python copy of a config node (dicts and lists), safe to ship to Ray workers."""
    if isinstance(node, DictConfig) or OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True, throw_on_missing=True)
    return node
