"""Shared fixtures: Hydra composition, a tiny model and tokenizer, and one local Ray cluster per session."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
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
# Ray clusters and run drivers started from here inherit these two. A Ray Train run in a test is ~40 s, nearly all of
# it start-up, on 2 cores:
# - its controller polls the workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s), and only then registers a reported
#   checkpoint or sees that training finished; a worker's next report waits for that poll (a result queue of one):
#   poll every 0.5 s;
# - a raylet kills idle workers while it runs more workers than RAY_num_workers_soft_limit (default: its CPUs, 4
#   here); a run holds ~10 actor processes, so each run killed the idle workers whose data tasks had imported the
#   tokenizer and data code, and the next run's data tasks started cold: 16 keeps them (a run: ~38 -> ~28 s).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_num_workers_soft_limit", "16")
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


def raytrain_at_once(*argvs: Sequence[str], envs: Sequence[Mapping[str, str]] | None = None,
                     timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """`python -m raytrain ARGV` (in the repository) for each argv, all started at once, as finished processes with
    their exit status, stdout and stderr (text); `envs`: each one's environment (default: this one's). A CLI spends
    most of its seconds importing torch and Ray on one core, so the second core runs another meanwhile."""
    procs = [subprocess.Popen([sys.executable, "-m", "raytrain", *argv], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
             for argv, env in zip(argvs, envs or [None] * len(argvs), strict=True)]
    try:
        outputs = [p.communicate(timeout=timeout) for p in procs]
        return [subprocess.CompletedProcess(p.args, p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests that shut the session's cluster down (`two_nodes` starts one of its own) last, so that the session
    starts Ray once rather than again (cold) for the Ray tests after them."""
    items.sort(key=lambda item: "two_nodes" in getattr(item, "fixturenames", ()))


def preset(name: str):
    """A model preset of conf/model/ as its typed config."""
    from omegaconf import OmegaConf

    from raytrain.models.registry import model_config

    return model_config(OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml"))
