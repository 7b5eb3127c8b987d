"""Shared fixtures: Hydra composition, a tiny model and tokenizer, and one local Ray cluster per session."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # before anything imports triton (raytrain.cli does): its kernels run interpreted
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hydra import compose as hydra_compose  # noqa: E402
from hydra import initialize_config_dir  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from raytrain.cli import CONF_DIR  # noqa: E402
from raytrain.models.decoder import DecoderConfig, LayerScaling  # noqa: E402

os.environ.setdefault("WANDB_MODE", "disabled")
REPO = Path(__file__).resolve().parent.parent


def triton_device(missing: str) -> str:
    """The device a Triton kernel test runs on: CUDA, else CPU through Triton's interpreter, which must be switched
    on before triton is first imported (this module does it at import, before raytrain imports triton). Skips the
    calling module (`missing`: why) when triton is absent."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if importlib.util.find_spec("triton") is None:
        pytest.skip(missing, allow_module_level=True)
    if device == "cpu":
        if "triton" in sys.modules and not os.environ.get("TRITON_INTERPRET"):
            pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set; run this file on its own",
                        allow_module_level=True)
        os.environ["TRITON_INTERPRET"] = "1"
    return device


def compose(config_name: str, overrides: list[str] | None = None) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides or [])


@pytest.fixture
def micro_cfg() -> DecoderConfig:
    """A 2-layer decoder with layer-wise scaling and GQA (layer 0: 2 query / 1 KV head; layer 1: 4 / 2)."""
    return DecoderConfig(name="micro", vocab_size=97, d_model=64, n_layers=2, head_dim=16, max_seq_len=64,
                         layer_scaling=LayerScaling(gqa_group=2, ffn_divisor=32))


@pytest.fixture
def micro_model(micro_cfg: DecoderConfig) -> torch.nn.Module:
    from raytrain.models.decoder import build_decoder

    torch.manual_seed(0)
    return build_decoder(micro_cfg).eval()


@pytest.fixture(scope="session")
def tokenizer():
    from raytrain.data.corpus import documents
    from raytrain.data.tokenizer import train_bpe

    return train_bpe(documents()[:20], vocab_size=512)


def local_ray():
    """One local Ray cluster for the session, started again if a multi-node test disconnected from it."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=True)
    return ray


@pytest.fixture
def ray_cluster():
    return local_ray()


def preset(name: str):
    """A model preset of conf/model/ as its typed config."""
    from omegaconf import OmegaConf

    from raytrain.models.registry import model_config

    return model_config(OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml"))
